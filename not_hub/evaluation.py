"""Evaluation: sliding-window perplexity that respects document boundaries, and position sweeps."""

from __future__ import annotations

import math
import numbers
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .architectures import context_length
from .data import BlockData, tokenize_documents
from .errors import DataError, InvalidArgumentError, InvalidPositionError
from .plan import get_mode, valid_positions
from .training import recover


@dataclass
class PerplexityResult:
    """`perplexity = exp(nll)`, the mean negative log-likelihood over `tokens` scored tokens."""

    perplexity: float
    nll: float
    tokens: int


def _as_token_lists(documents, tokenizer) -> list[list[int]]:
    if documents and isinstance(documents[0], str):
        if tokenizer is None:
            raise InvalidArgumentError("documents are strings: pass tokenizer=... to tokenise them")
        return tokenize_documents(documents, tokenizer)
    return [list(map(int, d)) for d in documents]


DEFAULT_MAX_LENGTH = 512


def _check_window(model: nn.Module, max_length, stride) -> int:
    """Validate the window; return `max_length` (None: 512, or the model's context when that is shorter)."""

    def is_int(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    limit = context_length(getattr(model, "config", None))
    if max_length is None:
        max_length = min(DEFAULT_MAX_LENGTH, limit or DEFAULT_MAX_LENGTH)

    if not is_int(max_length) or max_length < 2:
        raise InvalidArgumentError(
            f"max_length={max_length!r} is not allowed; expected an integer >= 2 (a window needs a token of context)"
        )
    if limit is not None and max_length > limit:
        raise InvalidArgumentError(
            f"max_length={max_length} is longer than the model's context of {limit} tokens; pass max_length <= {limit}"
        )
    if stride is not None and (not is_int(stride) or not 1 <= stride <= max_length):
        raise InvalidArgumentError(
            f"stride={stride!r} is not allowed; expected an integer in [1, max_length={max_length}], or None "
            "(max_length // 2)"
        )
    return max_length


@torch.no_grad()
def perplexity(
    model: nn.Module,
    documents: Sequence[str] | Sequence[Sequence[int]],
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_length: int | None = None,
    stride: int | None = None,
    progress: bool = False,
) -> PerplexityResult:
    """Sliding-window perplexity over documents, never letting a window span two documents.

    Each document is scored on its own: the first window covers its first `max_length` tokens; each next window
    ends `stride` tokens later (default `max_length // 2`, at most `max_length - 1`) and scores only the tokens it
    adds, with the rest of the window as context. Every token after the document's first is scored exactly once,
    with context from its own document only. The first token of a document has no context and is not scored.

    Args:
        model: a causal LM (eval mode is used, and restored).
        documents: strings (with `tokenizer`) or token-id lists.
        max_length: window length in tokens (default 512, or the model's context when shorter; a longer
            window than the model's context is refused).
        stride: window step; smaller gives each token more context at more compute.

    Returns:
        `PerplexityResult(perplexity, nll, tokens)`.
    """
    if isinstance(documents, (str, bytes)):
        raise InvalidArgumentError(
            "documents is one string; pass a list of documents (e.g. [text]), so it is not scored character by "
            "character as one-letter documents"
        )
    max_length = _check_window(model, max_length, stride)
    stride = stride if stride is not None else max(1, max_length // 2)
    docs = _as_token_lists(list(documents), tokenizer)
    vocab = model.get_input_embeddings().num_embeddings if hasattr(model, "get_input_embeddings") else None
    outside = next(((i, t) for i, d in enumerate(docs) for t in d if t < 0 or (vocab and t >= vocab)), None)
    if outside is not None:
        raise DataError(
            f"document {outside[0]} holds token id {outside[1]}, outside the model's vocabulary [0, {vocab}); "
            "tokenise with the model's own tokenizer (or pass strings and tokenizer=...)"
        )
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_nll, scored = 0.0, 0
    # Each window scores the tokens after the previous window's end, with up to max_length tokens of context from
    # the same document; it advances by `stride`, but by at most max_length - 1 so that a new token always has at
    # least one token of context inside its window.
    step = min(stride, max_length - 1) if max_length > 1 else 1
    for doc in tqdm(docs, desc="perplexity", unit="doc", disable=not progress):
        n = len(doc)
        if n < 2:
            continue
        first, end = 1, min(max_length, n)  # score positions [first, end)
        while True:
            begin = max(0, end - max_length)
            ids = torch.tensor(doc[begin:end], device=device)[None]  # (1, T)
            logits = model(input_ids=ids, use_cache=False).logits[0].float()  # (T, V)
            # The token at position p is predicted by the logits at position p - 1.
            logp = torch.log_softmax(logits[first - begin - 1 : end - begin - 1], dim=-1)
            targets = ids[0, first - begin : end - begin]
            total_nll -= float(logp.gather(1, targets[:, None]).sum())
            scored += end - first
            if end == n:
                break
            first, end = end, min(end + step, n)
    model.train(was_training)
    if scored == 0:
        raise DataError("no token could be scored: every document is shorter than 2 tokens")
    nll = total_nll / scored
    return PerplexityResult(perplexity=math.exp(nll), nll=nll, tokens=scored)


@dataclass
class SweepResult:
    """Perplexity for each (mode, position), with the untouched recipient's figure and per-mode statistics."""

    baseline: PerplexityResult
    rows: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, dict[str, float]]:
        """Per mode: mean and (population) variance of perplexity across positions, and the best position."""
        out = {}
        for mode in sorted({r["mode"] for r in self.rows}):
            values = [r["perplexity"] for r in self.rows if r["mode"] == mode]
            best = min((r for r in self.rows if r["mode"] == mode), key=lambda r: r["perplexity"])
            out[mode] = {
                "mean": statistics.fmean(values),
                "variance": statistics.pvariance(values),
                "best_position": best["position"],
                "best_perplexity": best["perplexity"],
            }
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"baseline": vars(self.baseline), "rows": self.rows, "summary": self.summary()}


def position_sweep(
    organ,
    recipient: nn.Module,
    documents: Sequence[str] | Sequence[Sequence[int]],
    *,
    positions: Sequence[int] | None = None,
    modes: Sequence[str] = ("replace",),
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_length: int | None = None,
    stride: int | None = None,
    recovery_data: BlockData | None = None,
    recovery_kwargs: dict | None = None,
    progress: bool = True,
    on_row: Callable[[dict[str, Any], int, int], None] | None = None,
    baseline: PerplexityResult | None = None,
) -> SweepResult:
    """Perplexity of `recipient` with `organ` transplanted at each position and mode (explanted after each).

    Without recovery by default; with `recovery_data`, each transplant is recovery-fine-tuned first
    (`not_hub.training.recover(**recovery_kwargs)`) and the recipient is still restored bit-exactly afterwards.

    Args:
        positions: positions to try (default: every valid one for the first mode).
        modes: any of "replace", "insert", "bridge".
        on_row: called as `on_row(row, done, total)` after each transplant is measured (e.g. a UI progress bar).
        baseline: the untouched recipient's figure on the same documents, if already measured (not recomputed).

    Returns:
        `SweepResult` with one row per (mode, position), the untouched baseline and `summary()` statistics.
    """
    depth = recipient.config.num_hidden_layers
    k = organ.config.num_layers
    jobs = []
    for mode in modes:
        get_mode(mode)
        valid = valid_positions(mode, k, depth)
        outside = [p for p in positions or () if p not in valid]
        if outside:
            raise InvalidPositionError(
                f"positions {outside} do not fit a {k}-layer organ in a {depth}-layer recipient in mode={mode!r}; "
                f"expected {valid.start} <= position <= {valid.stop - 1}"
            )
        jobs += [(mode, p) for p in (positions if positions is not None else valid)]
    if not jobs:
        raise InvalidArgumentError("nothing to sweep: pass at least one mode and one position (or positions=None)")
    docs = _as_token_lists(list(documents), tokenizer)
    if baseline is None:
        baseline = perplexity(recipient, docs, max_length=max_length, stride=stride)
    result = SweepResult(baseline=baseline)
    for mode, position in tqdm(jobs, desc="position sweep", unit="transplant", disable=not progress):
        with organ.transplanted(recipient, position=position, mode=mode) as transplant:
            row: dict[str, Any] = {"mode": mode, "position": position}
            if recovery_data is not None:
                metrics = recover(
                    recipient, transplant, recovery_data, **{"progress": False, **(recovery_kwargs or {})}
                )
                row["recovery_wall_clock_s"] = metrics.wall_clock_s
            ppl = perplexity(recipient, docs, max_length=max_length, stride=stride)
            row.update(
                perplexity=ppl.perplexity,
                nll=ppl.nll,
                tokens=ppl.tokens,
                ratio_to_baseline=ppl.perplexity / baseline.perplexity,
            )
            result.rows.append(row)
        if on_row is not None:
            on_row(row, len(result.rows), len(jobs))
    return result


def add_evaluation_result(
    config,
    *,
    dataset: str,
    value: float,
    baseline: float,
    position: int,
    mode: str,
    split: str = "test",
    metric: str = "perplexity",
    dataset_type: str | None = None,
    **extra: Any,
) -> None:
    """Record an evaluation in an `OrganConfig` (shown in the card and its model-index); replaces a same-key entry.

    Raises:
        InvalidArgumentError: `value` or `baseline` is not a finite number (a NaN would be shown as a result).
    """
    for name, number in (("value", value), ("baseline", baseline)):
        if isinstance(number, bool) or not isinstance(number, numbers.Real) or not math.isfinite(number):
            raise InvalidArgumentError(f"{name}={number!r} is not a finite number; record a measured result")
    evaluation = dict(config.evaluation or {})
    results = [
        r
        for r in evaluation.get("results", [])
        if (r.get("dataset"), r.get("split"), r.get("position"), r.get("mode"), r.get("recovered"))
        != (dataset, split, position, mode, extra.get("recovered"))
    ]
    results.append(
        {
            "dataset": dataset,
            "dataset_type": dataset_type or dataset,
            "split": split,
            "metric": metric,
            "value": round(float(value), 4),
            "baseline": round(float(baseline), 4),
            "position": position,
            "mode": mode,
            **extra,
        }
    )
    evaluation["results"] = results
    config.evaluation = evaluation
