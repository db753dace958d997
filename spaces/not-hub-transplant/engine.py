"""The transplant Space's logic: loading (cached, memory-bounded), compatibility, transplant, sweep, export.

No gradio here (app.py is the UI). Every public function takes plain values and returns plain values or raises a
`not_hub.errors` error (one catalogue, shared with the library and the CLI) with a message meant for the page.

Concurrency: a recipient is loaded once (the untouched reference) plus one *working copy* that transplants happen
in. Each request takes the working copy's lock, transplants, computes, and explants before releasing it, so
concurrent visitors never see each other's organs; requests for one recipient queue behind that lock.
"""

from __future__ import annotations

import atexit
import copy
import hashlib
import os
import shutil
import tempfile
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

import not_hub
from not_hub.architectures import context_length
from not_hub.errors import (
    HubConnectionError,
    InvalidArgumentError,
    InvalidPositionError,
    InvalidRepoIdError,
    ModelLoadError,
    OrganNotFoundError,
)
from not_hub.evaluation import perplexity, position_sweep
from not_hub.loading import load_causal_lm
from not_hub.plots import sweep_figure, sweep_result_curves

HERE = Path(__file__).parent
DEFAULT_RECIPIENT = os.environ.get("NOT_HUB_SPACE_RECIPIENT", "smollm2")
# The organ trained by this project's pipeline ships with the Space; on the Hub it is referred to by repo id.
DEFAULT_ORGAN = os.environ.get("NOT_HUB_SPACE_ORGAN", str(HERE / "organ"))
DEFAULT_ORGAN_REPO_ID = "not-hub/smollm2-135m-code-organ"
# An untrained growth organ (LLaMA-Pro style: copies of recipient layers with their output projections zeroed),
# built on this page from the default recipient, never published: inserted, it changes nothing until trained.
GROWTH_ORGAN_ID = "not-hub/smollm2-135m-growth-organ"
GROWTH_LAYERS = 3
DEFAULT_RECIPIENT_NAME = "SmolLM2-135M-Instruct" if DEFAULT_RECIPIENT == "smollm2" else Path(DEFAULT_RECIPIENT).name
MAX_MODELS = int(os.environ.get("NOT_HUB_SPACE_MAX_MODELS", "2"))
MAX_NEW_TOKENS = 24
# Seconds between streamed tokens (0: as fast as the model goes); set it to watch a stream on a fast machine.
TOKEN_DELAY_S = float(os.environ.get("NOT_HUB_SPACE_TOKEN_DELAY", "0"))
MAX_PROMPT_CHARS = 2_000
EVAL_MAX_LENGTH = 256

# Short samples written for this Space: a code domain (the default organ's) and general English.
DOMAIN_SAMPLE = [
    "public int add(int a, int b) {return a + b;}",
    "public String getName() {return name;}",
    "public void setValue(int value) {this.value = value;}",
    "public boolean isEmpty() {return size == 0;}",
    "public override string ToString() {return Name;}",
    "public virtual void Clear() {items.Clear();count = 0;}",
]
GENERAL_SAMPLE = [
    "The river rose slowly through the night, and by morning the lower fields were under water. Farmers moved "
    "their animals to the hill behind the village, where the old church stood.",
    "The mayor called a meeting in the school hall to decide how the town would repair the bridge before the "
    "markets opened again in spring.",
]
DEFAULT_PROMPT = "public int max(int a, int b) {"


def _server_folders() -> list[Path]:
    """Folders of this server a visitor may name: the page's own organ and recipient, and what the operator lists
    in NOT_HUB_SPACE_FOLDERS (separated by the OS path separator). Any other path is answered like a missing one,
    so a visitor cannot map which paths exist here."""
    listed = [f for f in os.environ.get("NOT_HUB_SPACE_FOLDERS", "").split(os.pathsep) if f.strip()]
    return [Path(f).expanduser().resolve() for f in [DEFAULT_ORGAN, DEFAULT_RECIPIENT, *listed] if Path(f).exists()]


SERVER_FOLDERS = _server_folders()


def _text(value, what: str) -> str:
    """A visitor's field as text ('' when empty); anything else (a number, a list, a file) is refused."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidArgumentError(f"the {what} must be given as text (a Hub repo id), not {type(value).__name__}")
    return value.strip()


def _position(value) -> int:
    """A layer position from a visitor: a whole number (3 or 3.0 from a slider); 2.7, True or 'x' are refused, not
    rounded or taken as 1."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__index__"):
        raise InvalidPositionError(f"position={value!r} is not a layer position; give a whole number such as 3")
    if isinstance(value, float) and not value.is_integer():
        raise InvalidPositionError(f"position={value!r} is not a whole number; layers are counted 0, 1, 2, ...")
    return int(value)


def _is_hub_id(ref: str) -> bool:
    """`namespace/name` that is not a path of this server."""
    return not ref.startswith(("/", ".", "~", "\\")) and ref.count("/") == 1 and not Path(ref).exists()


def _reachable(ref: str) -> bool:
    """A local path a visitor may use: inside one of SERVER_FOLDERS (resolved, so `..` and links cannot leave it)."""
    try:
        resolved = Path(ref).expanduser().resolve()
    except (OSError, RuntimeError):
        return False
    return any(resolved == root or root in resolved.parents for root in SERVER_FOLDERS)


@dataclass
class Loaded:
    model: torch.nn.Module  # untouched reference, never transplanted into
    working: torch.nn.Module  # transplants happen here, under `lock`, and are explanted before it is released
    tokenizer: object
    lock: threading.Lock


class ModelCache:
    """At most `max_models` recipients in memory (least recently used evicted), each loaded once."""

    def __init__(self, max_models: int = MAX_MODELS):
        self.max_models = max_models
        self._models: OrderedDict[str, Loaded] = OrderedDict()
        self._organs: OrderedDict[str, not_hub.OrganModel] = OrderedDict()
        self._lock = threading.Lock()

    def recipient(self, name: str) -> Loaded:
        name = _text(name, "recipient") or DEFAULT_RECIPIENT
        with self._lock:
            if name in self._models:
                self._models.move_to_end(name)
                return self._models[name]
        # One message for every failure (unknown repo, unreachable Hub, a server path that is not offered, one that
        # does not exist): nothing about this server's files or network leaks to a visitor.
        refused = ModelLoadError(
            f"could not load recipient {name[:120]!r}: give the Hub repo id of a decoder-only causal LM, "
            f"or leave the field empty for this page's model ({DEFAULT_RECIPIENT_NAME})"
        )
        if name not in ("smollm2", DEFAULT_RECIPIENT) and not _is_hub_id(name) and not _reachable(name):
            raise refused
        try:
            model, tokenizer = load_causal_lm(name)
        except ModelLoadError:
            raise refused from None
        not_hub.resolve_architecture(model)  # refuse encoders etc. before caching
        loaded = Loaded(model=model, working=copy.deepcopy(model), tokenizer=tokenizer, lock=threading.Lock())
        with self._lock:
            self._models[name] = loaded
            while len(self._models) > self.max_models:
                self._models.popitem(last=False)
        return loaded

    def organ(self, ref: str) -> not_hub.OrganModel:
        ref = _text(ref, "organ") or DEFAULT_ORGAN
        if ref == DEFAULT_ORGAN_REPO_ID:
            ref = DEFAULT_ORGAN  # this page's organ, shipped with it (its repo id names it in downloads)
        with self._lock:
            if ref in self._organs:
                return self._organs[ref]
        if ref == GROWTH_ORGAN_ID:
            organ = _growth_organ()
            with self._lock:
                return self._organs.setdefault(ref, organ)
        # Said to a web visitor: no shell commands, environment variables or paths of this server.
        missing = OrganNotFoundError(
            f"no organ found at {ref[:120]!r}: give the Hub repo id of an organ (e.g. {DEFAULT_ORGAN_REPO_ID}) or "
            "leave the field empty for this page's default organ"
        )
        if ref != DEFAULT_ORGAN and not _is_hub_id(ref) and not _reachable(ref):
            raise missing
        try:
            organ = not_hub.OrganModel.from_pretrained(ref)
        except OrganNotFoundError:
            raise missing from None
        with self._lock:
            self._organs[ref] = organ
            while len(self._organs) > 8:
                self._organs.popitem(last=False)
        return organ


CACHE = ModelCache()


def _growth_organ() -> not_hub.OrganModel:
    """GROWTH_LAYERS identity layers for the default recipient, inserted by default at a third of its depth."""
    model = CACHE.recipient(DEFAULT_RECIPIENT).model
    depth = model.config.num_hidden_layers
    organ = not_hub.grow_organ(model, depth // 3, num_layers=min(GROWTH_LAYERS, depth))
    organ.config.base_model = public_model_name(DEFAULT_RECIPIENT, model)
    return organ


def growth_note(organ_ref: str, mode: str) -> str:
    """What a visitor must know about a growth organ: untrained and inserted, it is the identity."""
    config = CACHE.organ(organ_ref).config
    if not config.growth:
        return ""
    if config.training:
        return " A trained growth organ: it adds depth, and replaces no layer when inserted."
    if mode == "replace":
        return (
            " A growth organ is meant to be inserted: replacing layers with it removes those layers (choose insert "
            "to see it change nothing)."
        )
    return (
        " This growth organ is untrained: its new layers pass what they receive through unchanged, so the numbers "
        "and text are exactly the untouched model's. Trained, it adds layers without replacing any."
    )


def _layers_words(start: int, stop: int, total: int | None) -> str:
    """A layer range in words a visitor reads: "layers 10 to 12 of 30 (numbered from 0)"."""
    first, last = start, stop - 1
    span = f"layer {first}" if first == last else f"layers {first} to {last}"
    return f"{span} of {total} (numbered from 0)" if total else span


def number(value: float) -> str:
    """A perplexity as a visitor reads it: 2 decimals when small, thousands separated and no decimals when large."""
    return f"{value:,.2f}" if abs(value) < 1000 else f"{value:,.0f}"


def ratio(value: float) -> str:
    """A ratio to the untouched model: "0.59x", "1.3x", "11,401x"."""
    return f"{value:.2f}x" if abs(value) < 10 else f"{value:,.1f}x" if abs(value) < 1000 else f"{value:,.0f}x"


def organ_metadata(organ_ref: str) -> dict:
    """What a visitor should know about an organ before using it."""
    organ = CACHE.organ(organ_ref)
    c = organ.config
    training = c.training or {}
    corpus = training.get("corpus") or (training.get("data") or {}).get("domain")
    page = next((r for r in (c.evaluation or {}).get("results", []) if r.get("split") == "page"), None)
    name = public_organ_name(organ_ref)
    info = {
        "organ": name,
        "donor (base_model)": c.base_model,
        "donor layers": _layers_words(c.layer_range[0], c.layer_range[1], c.donor_num_hidden_layers)
        + (f" + {c.layer_roles.count('neighbour')} recovered neighbours" if "neighbour" in c.layer_roles else ""),
        "donor model_type": c.donor_model_type,
        "trained": (
            f"{training.get('method')} on {training.get('tokens_seen', 0):,} tokens"
            + (f" of {corpus}" if corpus else "")
        )
        if training
        else "no",
        "parameters": f"{sum(p.numel() for p in organ.parameters()):,}",
        **(
            {
                "growth": "new layers copied from layers "
                f"{c.growth['source_layers'][0]} to {c.growth['source_layers'][1] - 1}, set to pass their input "
                "through unchanged until trained"
            }
            if c.growth
            else {}
        ),
        "bridges": c.bridges,
    }
    if page:
        info["measured on this page"] = (
            f"code perplexity {number(page['value'])} with the organ vs {number(page['baseline'])} untouched "
            f"({ratio(page['value'] / page['baseline'])}), {page['mode']} at {page['position']}"
        )
    return info


GROWTH_CARD = (
    f"**An untrained growth organ**, built on this page (not published): {GROWTH_LAYERS} copies of the recipient's "
    "own layers just below where it goes, with the attention output and MLP down projections set to zero (as "
    "LLaMA-Pro, arXiv 2401.02415, grows a model). Inserted, each new layer passes what it receives through unchanged, "
    "so the model computes exactly what it did; trained, the new layers learn a domain while every original "
    "layer stays as it was. Made with `not_hub.grow_organ(model, position, num_layers=3)`."
)


def organ_card(organ_ref: str) -> tuple[str, str | None]:
    """The organ's card (markdown, without its YAML header) and its Hub page when it is published there."""
    from huggingface_hub import ModelCard, constants

    organ = CACHE.organ(organ_ref)
    if (organ_ref or "").strip() == GROWTH_ORGAN_ID:
        return GROWTH_CARD, None
    path = Path(str(organ.name_or_path or "")) / "README.md"
    raw = path.read_text(errors="replace") if path.is_file() else ""
    try:
        text = ModelCard(raw).text.strip() if raw else ""
    except Exception:  # a card whose YAML header cannot be read: show its body, say so, keep serving
        body = raw.split("---", 2)[2] if raw.startswith("---") and raw.count("---") >= 2 else raw
        text = "*(This card's metadata header cannot be read; its text follows.)*\n\n" + body.strip()
    name = public_organ_name(organ_ref)
    ref = (organ_ref or "").strip()
    url = f"{constants.ENDPOINT}/{name}" if ref and name == ref and not Path(ref).exists() else None
    return text or "This organ has no card.", url


def compatibility(organ_ref: str, recipient_name: str) -> tuple[list[list], bool]:
    """Rows [field, donor, recipient, status] of the compatibility report, and whether the organ fits."""
    organ = CACHE.organ(organ_ref)
    loaded = CACHE.recipient(recipient_name)
    report = organ.check_compatibility(loaded.model)
    rows = []
    for r in report.rows:
        if r.field == "parameter_shapes":
            donor, recipient = f"{len(r.donor or {})} tensors", f"{len(r.recipient or {})} tensors"
        elif r.field == "decoder_layer_class":  # module:Class -> Class (the module path is long)
            donor, recipient = str(r.donor).rpartition(":")[2], str(r.recipient).rpartition(":")[2]
        else:
            donor, recipient = str(r.donor), str(r.recipient)
        rows.append([r.field, donor, recipient, "BLOCKS" if r.blocking else ("ok" if r.matches else "differs")])
    return rows, report.compatible


def default_position(organ_ref: str, recipient_name: str, mode: str) -> int:
    """Where the organ belongs: its recorded default transplant when that is a replace of as many layers as it holds
    (an organ carrying its recovered neighbours), else its own donor start (the identity slot), else 0."""
    lo, hi = position_range(organ_ref, recipient_name, mode)
    config = CACHE.organ(organ_ref).config
    default = config.default_transplant or {}
    start = config.layer_range[0]
    if mode == "replace" and default.get("remove") == config.num_layers:
        start = default["position"]
    elif mode == "insert" and config.growth and "position" in default:  # a growth organ: where it was grown for
        start = default["position"]
    return start if lo <= start <= hi else lo


def position_range(organ_ref: str, recipient_name: str, mode: str) -> tuple[int, int]:
    """The valid positions (inclusive) for this organ, recipient and mode."""
    organ = CACHE.organ(organ_ref)
    depth = CACHE.recipient(recipient_name).model.config.num_hidden_layers
    valid = not_hub.valid_positions(mode, organ.config.num_layers, depth)
    return valid.start, valid.stop - 1


def _window(model) -> int:
    """The perplexity window: EVAL_MAX_LENGTH, or the recipient's context when that is shorter."""
    return min(EVAL_MAX_LENGTH, context_length(model.config) or EVAL_MAX_LENGTH)


def _check_prompt(prompt: str) -> str:
    if not prompt or not prompt.strip():
        raise InvalidArgumentError("the prompt is empty: type a few words for both models to continue")
    return prompt


def organ_labels(organ) -> list[str]:
    """One label per organ layer: where it came from (a donor layer, or a neighbour recovery trained)."""
    c = organ.config
    return [
        f"donor L{i}" if role == "organ" else f"recovered L{i}"
        for role, i in zip(c.layer_roles, c.layer_indices, strict=True)
    ]


def layer_stack_figure(depth: int, position: int, mode: str, labels: list[str]):
    """The recipient's layers as a column of boxes: the organ's marked with where they came from, the recipient's
    labelled by their index in the untouched model (so an insert does not look like a replacement)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(labels)
    removed = k if mode == "replace" else 0
    total = depth - removed + k
    fig, ax = plt.subplots(figsize=(3.6, max(4.0, total * 0.22)))
    for i in range(total):
        in_organ = position <= i < position + k
        if in_organ:
            label = labels[i - position]
            color = "#f0a35e" if label.startswith("recovered") else "#e4572e"
        else:
            label, color = f"L{i if i < position else i - k + removed}", "#a0c4e4"
        ax.add_patch(plt.Rectangle((0, i), 1, 0.85, color=color))
        ax.text(0.5, i + 0.42, label, ha="center", va="center", fontsize=7)
    if mode == "bridge":
        for y in (position - 0.1, position + k - 0.05):
            ax.plot([0, 1], [y, y], color="black", linewidth=2)
    ax.set_xlim(0, 1)
    ax.set_ylim(total, -0.2)
    ax.axis("off")
    ax.set_title(f"{mode} at position {position}\n({total} layers, organ in red)", fontsize=9)
    fig.tight_layout()
    return fig


@dataclass
class TransplantReport:
    position: int
    mode: str
    depth_after: int
    domain_before: float
    domain_after: float
    general_before: float
    general_after: float
    figure: object


def transplant_and_measure(recipient_name: str, organ_ref: str, mode: str, position: int) -> TransplantReport:
    """Transplant into the working copy, measure perplexity on both samples, explant. Atomic under the lock."""
    organ = CACHE.organ(organ_ref)
    loaded = CACHE.recipient(recipient_name)
    tok = loaded.tokenizer
    domain_before = perplexity(loaded.model, DOMAIN_SAMPLE, tokenizer=tok, max_length=_window(loaded.model)).perplexity
    general_before = perplexity(
        loaded.model, GENERAL_SAMPLE, tokenizer=tok, max_length=_window(loaded.model)
    ).perplexity
    with loaded.lock:
        with organ.transplanted(loaded.working, position=_position(position), mode=mode):
            domain_after = perplexity(loaded.working, DOMAIN_SAMPLE, tokenizer=tok, max_length=_window(loaded.model))
            general_after = perplexity(loaded.working, GENERAL_SAMPLE, tokenizer=tok, max_length=_window(loaded.model))
            depth_after = loaded.working.config.num_hidden_layers
    depth = loaded.model.config.num_hidden_layers
    figure = layer_stack_figure(depth, _position(position), mode, organ_labels(organ))
    return TransplantReport(
        _position(position),
        mode,
        depth_after,
        domain_before,
        domain_after.perplexity,
        general_before,
        general_after.perplexity,
        figure,
    )


def check_prompt_fits(prompt: str, tokenizer, model, max_new_tokens: int) -> torch.Tensor:
    """Token ids of `prompt`, refused when it is longer than the page allows or the recipient's context fits.

    A long prompt would hold the recipient for minutes (every visitor waits behind it), and one past a fixed
    context (gpt2's `n_positions`) would crash the model.
    """
    _check_prompt(prompt)
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidArgumentError(
            f"the prompt has {len(prompt):,} characters; this page continues prompts of up to {MAX_PROMPT_CHARS:,}"
        )
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    limit = context_length(model.config)
    if limit is not None and ids.shape[1] + max_new_tokens > limit:
        raise InvalidArgumentError(
            f"the prompt is {ids.shape[1]:,} tokens; with {max_new_tokens} new tokens that exceeds the recipient's "
            f"context of {limit:,} tokens. Shorten it to at most {limit - max_new_tokens:,} tokens"
        )
    return ids


def check_inputs(recipient_name: str, organ_ref: str, mode: str, position, prompt: str) -> None:
    """Every field of a transplant request, checked before anything runs (a bad prompt is said at once, not after the
    transplant and its measurement)."""
    if not isinstance(prompt, str):
        raise InvalidArgumentError("the prompt must be text")
    position = _position(position)
    loaded = CACHE.recipient(recipient_name)
    check_prompt_fits(prompt, loaded.tokenizer, loaded.model, MAX_NEW_TOKENS)
    if mode not in not_hub.MODES or mode == "excise":
        raise InvalidArgumentError(f"mode {mode!r} is not offered here; choose replace, insert or bridge")
    lo, hi = position_range(organ_ref, recipient_name, mode)
    if not lo <= position <= hi:
        raise InvalidPositionError(f"position {position} does not fit: expected {lo} <= position <= {hi} for {mode}")


def bridge_note(organ_ref: str, mode: str) -> str:
    """What a visitor must know about mode "bridge" with this organ: untrained bridges are the identity."""
    if mode != "bridge" or CACHE.organ(organ_ref).config.bridges:
        return ""
    return (
        " This organ has no trained bridges, so its bridges start as the identity: the numbers and text are exactly "
        "those of insert at the same position (training would change them)."
    )


@dataclass
class Stream:
    """One visitor's running generation: `stop` asks it to end, `done` says it has."""

    session: str | None
    stop: threading.Event
    done: threading.Event
    explanted: bool = False  # stopped by the visitor's Explant (not by a newer request of the same visitor)


class Streams:
    """The running generations by visitor session, so that Explant can stop the visitor's own stream."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._live: dict[str | None, Stream] = {}

    def start(self, session: str | None) -> Stream:
        """Register a new stream for `session`, stopping the session's previous one."""
        stream = Stream(session, threading.Event(), threading.Event())
        with self._lock:
            previous = self._live.get(session)
            self._live[session] = stream
        if previous is not None:
            previous.stop.set()
        return stream

    def finish(self, stream: Stream) -> None:
        with self._lock:
            if self._live.get(stream.session) is stream:
                del self._live[stream.session]
        stream.done.set()

    def stop(self, session: str | None, timeout: float = 30.0) -> bool:
        """Stop the session's stream and wait until it has ended (so nothing it sends lands after the caller's
        update); returns whether one was running."""
        with self._lock:
            stream = self._live.get(session)
        if stream is None:
            return False
        stream.explanted = True
        stream.stop.set()
        stream.done.wait(timeout)
        return True


STREAMS = Streams()


END_OF_TEXT = " [end of text]"
DECODING_NOTE = (
    f"Both sides decode the same way: greedy (the most likely token each step), at most {MAX_NEW_TOKENS} new tokens, "
    f"and each side stops at its own end-of-text token, shown as `{END_OF_TEXT.strip()}`."
)


def end_of_text_ids(model, tokenizer) -> set[int]:
    """The token ids that end a generation: the model's generation config's and the tokenizer's end-of-text."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


@torch.no_grad()
def stream_side_by_side(
    recipient_name: str,
    organ_ref: str,
    mode: str,
    position: int,
    prompt: str,
    max_new_tokens: int = MAX_NEW_TOKENS,
    stop: threading.Event | None = None,
) -> Iterator[tuple[str, str]]:
    """Greedy continuations of `prompt` by the untouched and the transplanted model, one token each per step.

    The working copy's lock is taken for one step at a time (transplant, one forward pass, explant), never across
    a `yield`: a visitor who stops reading the stream (or pauses it) cannot hold the recipient for everyone else.
    Re-transplanting the same organ at the same place gives the same layers, so the KV cache stays valid. The
    stream ends early, before its next token, once `stop` is set.
    """
    stop = stop if stop is not None else threading.Event()
    position = _position(position)
    organ = CACHE.organ(organ_ref)
    loaded = CACHE.recipient(recipient_name)
    tok = loaded.tokenizer
    ids = check_prompt_fits(prompt, tok, loaded.model, max_new_tokens)
    eos = end_of_text_ids(loaded.model, tok)
    states = [[loaded.model, ids, None, []], [loaded.working, ids, None, []]]
    ended = [False, False]

    def text(index: int) -> str:
        return tok.decode(states[index][3], skip_special_tokens=True) + (END_OF_TEXT if ended[index] else "")

    for _ in range(max_new_tokens):
        if stop.wait(TOKEN_DELAY_S):  # set (now, or during the delay): end before the next token
            return
        for index, state in enumerate(states):
            if ended[index]:  # this side wrote its end-of-text token: it says no more
                continue
            model, inp, past, out = state
            if index == 0:
                result = model(input_ids=inp, cache=past, use_cache=True)
            else:
                with loaded.lock, organ.transplanted(loaded.working, position=position, mode=mode):
                    result = model(input_ids=inp, cache=past, use_cache=True)
            nxt = result.logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
            state[1], state[2] = nxt, result.cache
            if int(nxt) in eos:
                ended[index] = True
            else:
                out.append(int(nxt))
        yield text(0), text(1)
        if all(ended):
            return


def sweep(
    recipient_name: str,
    organ_ref: str,
    mode: str,
    use_domain: bool = True,
    progress: Callable[[float, str], None] | None = None,
    positions: list[int] | None = None,
) -> dict:
    """Perplexity at every valid position (working copy, explanted after each), as a dict plus a figure."""
    organ = CACHE.organ(organ_ref)
    loaded = CACHE.recipient(recipient_name)
    docs = DOMAIN_SAMPLE if use_domain else GENERAL_SAMPLE
    lo, hi = position_range(organ_ref, recipient_name, mode)
    asked = [_position(p) for p in positions] if positions else list(range(lo, hi + 1))
    positions = [p for p in asked if lo <= p <= hi]
    if not positions:
        raise InvalidPositionError(
            f"none of the positions {asked} fits: expected {lo} <= position <= {hi} for mode {mode!r}"
        )
    # The lock is taken for one position at a time, so a transplant asked for during a sweep waits for one position,
    # not for the whole sweep.
    result = None
    for done, p in enumerate(positions, start=1):
        with loaded.lock:
            one = position_sweep(
                organ,
                loaded.working,
                docs,
                tokenizer=loaded.tokenizer,
                positions=[p],
                modes=[mode],
                max_length=_window(loaded.model),
                progress=False,
                baseline=result.baseline if result is not None else None,  # measured once, on the first position
            )
        if result is None:
            result = one
        else:
            result.rows += one.rows
        if progress:
            progress(done / len(positions), f"position {p}")
    rows, baseline, stats = result.rows, result.baseline, result.summary()[mode]
    fig = sweep_figure(sweep_result_curves(rows), baseline=baseline.perplexity, size=(6, 3.2), title=" ")
    return {
        "baseline": baseline.perplexity,
        "sample": "code" if use_domain else "general-text",
        "rows": rows,
        "mean": stats["mean"],
        "variance": stats["variance"],
        "best_position": stats["best_position"],
        "figure": fig,
    }


def sweep_summary(result: dict, mode: str) -> str:
    """The sweep in words a visitor reads: the best position, its perplexity and ratio, and what was measured."""
    best = min(result["rows"], key=lambda r: r["perplexity"])
    worst = max(result["rows"], key=lambda r: r["perplexity"])
    return (
        f"Best: position {best['position']}, perplexity {best['perplexity']:.2f}, "
        f"{ratio(best['perplexity'] / result['baseline'])} the untouched model ({number(result['baseline'])}). "
        f"Worst: position {worst['position']}, {ratio(worst['perplexity'] / result['baseline'])}. "
        f"{len(result['rows'])} positions, mode {mode}, on the {result.get('sample', 'code')} sample."
    )


def public_organ_name(organ_ref: str) -> str:
    """How an organ is named in anything a visitor downloads: its repo id, never a path on this server."""
    ref = (organ_ref or "").strip() or DEFAULT_ORGAN
    if ref == DEFAULT_ORGAN:
        return DEFAULT_ORGAN_REPO_ID
    if _is_hub_id(ref):
        return ref
    return Path(ref).name


def public_model_name(recipient_name: str, model) -> str:
    """A recipient's Hub id when known (e.g. the embedded SmolLM2), else its folder's name."""
    name = str(getattr(model, "name_or_path", "") or recipient_name or DEFAULT_RECIPIENT)
    return name if _is_hub_id(name) else Path(name).name


# Archives a visitor builds live here, one at a time: building another removes the previous one, and building the
# same transplant again returns the archive already built. app.py registers this folder with gradio as a static path,
# so gradio serves the archive from here instead of copying every one into its cache (where copies of 270 MB piled
# up for an hour); the folder is removed when the server stops (`remove_exports`, run at exit and on SIGTERM).
EXPORT_DIR = Path(tempfile.gettempdir()) / f"not-hub-export-{os.getpid()}"
_EXPORT_LOCK = threading.Lock()


def remove_exports() -> None:
    """Delete the export folder and the archive in it (the server is stopping)."""
    shutil.rmtree(EXPORT_DIR, ignore_errors=True)


atexit.register(remove_exports)

ARCHIVE_CARD = """---
library_name: transformers
base_model: {recipient}
tags: [not_hub, neural-organ-transplantation]
---

# {recipient} with an organ transplanted

Built on the not_hub Space: organ `{organ}` grafted into `{recipient}` ({mode} at position {position}). A plain
transformers checkpoint (`AutoModelForCausalLM.from_pretrained(folder)`); `config.transplants` records the organ.

**Weights are stored in bfloat16** (half the download). The page computed in float32 from float32 weights, so this
archive's outputs are close to the page's, not identical. The page's exact numbers come from the same transplant in
float32:

```python
import not_hub
from not_hub.loading import load_causal_lm
model, tokenizer = load_causal_lm({recipient_load!r})  # float32
not_hub.OrganModel.from_pretrained({organ!r}).transplant_into(model, position={position}, mode={mode!r})
```
"""


def export_folder(recipient_name: str, organ_ref: str, mode: str, position: int) -> str:
    """A .zip of the transplanted recipient (plain transformers folder + tokenizer + card); returns its path."""
    position = _position(position)
    if mode == "bridge":
        raise InvalidArgumentError(
            "a bridge-mode recipient is not a plain transformers model: download replace or insert"
        )
    organ = CACHE.organ(organ_ref)
    loaded = CACHE.recipient(recipient_name)
    organ_name = public_organ_name(organ_ref)
    recipient_public = public_model_name(recipient_name, loaded.model)
    key = hashlib.sha256(f"{recipient_name}|{organ_ref}|{mode}|{position}".encode()).hexdigest()[:12]
    archive = EXPORT_DIR / f"transplanted-{mode}-{position}-{key}.zip"
    with _EXPORT_LOCK:
        if archive.is_file():
            return str(archive)  # the same transplant: the archive already built
        EXPORT_DIR.mkdir(exist_ok=True)
        for old in EXPORT_DIR.iterdir():  # one archive at a time on this server's disk
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        work = Path(tempfile.mkdtemp(dir=EXPORT_DIR, prefix=".building-"))
        try:
            with loaded.lock:
                with organ.transplanted(loaded.working, position=position, mode=mode) as transplant:
                    # No path of this server in the download: the organ and the recipient are named, not located.
                    transplant.entry["organ"] = organ_name
                    copy_ = copy.deepcopy(loaded.working)  # a bf16 copy: half the bytes; the shared model unchanged
            copy_.config.name_or_path = recipient_public
            copy_.to(torch.bfloat16).save_pretrained(work)
            del copy_
            loaded.tokenizer.save_pretrained(work)
            recipient_load = "smollm2" if recipient_name in ("", "smollm2") else recipient_public
            (work / "README.md").write_text(
                ARCHIVE_CARD.format(
                    recipient=recipient_public, organ=organ_name, mode=mode, position=position,
                    recipient_load=recipient_load,
                )
            )  # fmt: skip
            partial = archive.with_suffix(".zip.partial")
            with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_STORED) as zf:  # weights do not compress
                for path in sorted(work.iterdir()):
                    zf.write(path, path.name)
            os.replace(partial, archive)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return str(archive)


def archive_estimate(recipient_name: str) -> str:
    """What building the archive will take, said before it starts."""
    loaded = CACHE.recipient(recipient_name)
    mb = 2 * sum(p.numel() for p in loaded.model.parameters()) / 1e6
    return f"Building the archive: about {mb:,.0f} MB of bfloat16 weights, stored uncompressed (a few seconds)..."


def is_busy(recipient_name: str) -> bool:
    """Whether another request holds the shared model right now (a new one will wait for it)."""
    return CACHE.recipient(recipient_name).lock.locked()


def push(recipient_name: str, organ_ref: str, mode: str, position: int, repo_id: str, token: str) -> str:
    """Push the transplanted recipient to the Hub with the visitor's own token; returns the commit URL.

    Only a token the visitor typed is ever used: with none, nothing is pushed. (huggingface_hub would otherwise fall
    back to the Space's own `HF_TOKEN` or login, and a visitor would push with its owner's credentials.)
    """
    from huggingface_hub import constants

    token = (token or "").strip() if isinstance(token, str) or token is None else None
    if not token:
        raise InvalidArgumentError(
            "pushing needs your own Hub token (a write token from huggingface.co/settings/tokens) in the token "
            "field; this page never pushes with its own credentials"
        )
    if constants.HF_HUB_OFFLINE:
        raise HubConnectionError("the Hub is not reachable from here (offline mode): use the download button instead")
    if not repo_id or repo_id.count("/") != 1:
        raise InvalidRepoIdError(f"repo id {repo_id!r} should look like 'your-name/your-model'")
    if mode == "bridge":
        raise InvalidArgumentError("a bridge-mode recipient is not a plain transformers model: push replace or insert")
    organ = CACHE.organ(organ_ref)
    loaded = CACHE.recipient(recipient_name)
    with loaded.lock:
        with organ.transplanted(loaded.working, position=_position(position), mode=mode):
            return not_hub.push_recipient(loaded.working, repo_id, tokenizer=loaded.tokenizer, token=token)
