"""Training on accelerate: standalone organ training (the paper), in-situ training, recovery, bridge training.

All four share one loop (`fit_parameters`, public for baselines such as LoRA): AdamW, linear warmup then linear decay, gradient accumulation, mixed precision
where the hardware has it, multi-process via `accelerate launch`, a progress bar with loss and tokens/s, periodic
validation with the best weights kept, and resumable checkpoints (a run killed mid-way and resumed reaches the same
weights as an uninterrupted run: the data order of each epoch depends only on the seed and the epoch).
Only the parameters being trained get gradients; every other weight is left bit-identical.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, RandomSampler
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from .architectures import context_length
from .data import BlockData
from .errors import (
    CheckpointFormatError,
    IncompatibleOrganError,
    InvalidArgumentError,
    InvalidModeError,
    RunDirMismatchError,
    TransplantStateError,
    UnexpectedArgumentError,
)
from .integrity import tensor_sha256
from .prefix_cache import DEFAULT_MEMORY_LIMIT, CachedPrefixModel, PrefixCache, blocks_to_cache, prefix_dropout
from .shells import standalone_shell
from .transplant import Transplant, check_compatibility

logger = logging.getLogger(__name__)

METHODS = ("standalone", "in_situ", "recovered")
# The method whose organ, pulled by repo id into a fresh recipient, gave the best test perplexity at equal
# wall-clock in benchmarks/gain.py (see the README); the paper's "standalone" is one argument away.
DEFAULT_METHOD = "in_situ"
_STATE_FILE = "trainer_state.json"
_BEST_FILE = "best_params.safetensors"
_IDENTITY_FILE = "run_identity.json"


@dataclass
class TrainingArguments:
    """Hyper-parameters of a training run (paper defaults: 5 epochs, lr 1e-4, 10% linear warmup, AdamW).

    Args:
        epochs: passes over the training blocks.
        lr: peak learning rate.
        warmup_ratio: fraction of optimizer steps with linear warmup (then linear decay to 0).
        weight_decay: AdamW weight decay.
        batch_size: blocks per process per micro-batch.
        gradient_accumulation_steps: micro-batches per optimizer step.
        max_grad_norm: gradient clipping (None: off).
        max_steps: stop after this many optimizer steps (the schedule is laid out for them).
        max_seconds: also stop once training has run this long (wall-clock budget; the schedule is not shortened).
        eval_every: validate every N optimizer steps (default: once per epoch); the best weights are kept.
        save_every: write a resumable checkpoint every N optimizer steps into `output_dir` (default: each epoch).
        output_dir: where checkpoints go; `None` trains without checkpoints.
        resume: continue from the newest checkpoint in `output_dir` if there is one.
        seed: seeds the data order and initialisation-free randomness.
        mixed_precision: "no", "bf16" or "fp16" (default: bf16 on a CUDA GPU, otherwise no).
        progress: show a progress bar (main process only).
    """

    epochs: float = 5.0
    lr: float = 1e-4
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = 1.0
    max_steps: int | None = None
    max_seconds: float | None = None
    eval_every: int | None = None
    save_every: int | None = None
    output_dir: str | None = None
    resume: bool = True
    seed: int = 0
    mixed_precision: str | None = None
    progress: bool = True

    def validate(self) -> TrainingArguments:
        """Refuse values that would be silently reinterpreted (a zero length, a NaN rate, ...); return self.

        Raises:
            InvalidArgumentError: the first field out of range, with what is allowed.
        """

        def number(name: str, value, *, integer: bool = False) -> float:
            kinds = (int,) if integer else (int, float)
            if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
                kind = "an integer" if integer else "a finite number"
                raise InvalidArgumentError(f"{name}={value!r} is not {kind}")
            return value

        def check(name: str, ok: bool, allowed: str) -> None:
            if not ok:
                raise InvalidArgumentError(f"{name}={getattr(self, name)!r} is not allowed; expected {allowed}")

        check("epochs", number("epochs", self.epochs) > 0, "epochs > 0 (use max_steps for a number of steps)")
        check("lr", number("lr", self.lr) > 0, "a learning rate > 0")
        check("warmup_ratio", 0 <= number("warmup_ratio", self.warmup_ratio) < 1, "0 <= warmup_ratio < 1")
        check("weight_decay", number("weight_decay", self.weight_decay) >= 0, "weight_decay >= 0")
        check("batch_size", number("batch_size", self.batch_size, integer=True) >= 1, "batch_size >= 1")
        check(
            "gradient_accumulation_steps",
            number("gradient_accumulation_steps", self.gradient_accumulation_steps, integer=True) >= 1,
            "gradient_accumulation_steps >= 1",
        )
        for name in ("max_steps", "eval_every", "save_every"):
            value = getattr(self, name)
            check(name, value is None or number(name, value, integer=True) >= 1, f"{name} >= 1, or None")
        check(
            "max_grad_norm",
            self.max_grad_norm is None or number("max_grad_norm", self.max_grad_norm) > 0,
            "max_grad_norm > 0, or None (no clipping)",
        )
        check(
            "max_seconds",
            self.max_seconds is None or number("max_seconds", self.max_seconds) >= 0,
            "max_seconds >= 0, or None (no budget)",
        )
        number("seed", self.seed, integer=True)
        check(
            "mixed_precision",
            self.mixed_precision in (None, "no", "bf16", "fp16"),
            "None (bf16 on a CUDA GPU, else no), 'no', 'bf16' or 'fp16'",
        )
        return self


# Fields that may change between a run and its resumption (they do not change what the weights become).
_RESUMABLE_FIELDS = frozenset({"output_dir", "resume", "progress", "max_seconds"})


def _args(args: TrainingArguments | None, kwargs: dict) -> TrainingArguments:
    args = TrainingArguments(**asdict(args)) if args is not None else TrainingArguments()
    for key, value in kwargs.items():
        if not hasattr(args, key):
            raise UnexpectedArgumentError(f"unknown training argument {key!r}; see not_hub.training.TrainingArguments")
        setattr(args, key, value)
    return args.validate()


@dataclass
class TrainingMetrics:
    """What a training run did, returned by every training function (and stored, as a dict, in the organ's config).

    Attributes:
        steps: optimizer steps taken. epochs: passes over the training blocks (fractional with `max_steps`).
        tokens_seen: training tokens, all processes together. wall_clock_s: training time including validation;
        validation_s: the validation part. final_train_loss: an EMA of the training loss. best_validation_loss /
        best_step: the kept weights' validation loss and step (None without validation data). history: one entry
        per validation. The rest echo the run's settings.
    """

    steps: int
    epochs: float
    tokens_seen: int
    lr: float
    warmup_ratio: float
    batch_size: int
    gradient_accumulation_steps: int
    num_processes: int
    mixed_precision: str
    seed: int
    final_train_loss: float | None
    best_validation_loss: float | None
    best_step: int | None
    wall_clock_s: float
    validation_s: float
    history: list[dict[str, Any]]

    @property
    def tokens_per_second(self) -> float:
        """Training throughput, validation excluded."""
        return self.tokens_seen / max(self.wall_clock_s - self.validation_s, 1e-9)

    def to_dict(self, *, history: bool = True) -> dict[str, Any]:
        out = asdict(self)
        if not history:
            out.pop("history")
        return out


class _Frozen:
    """Freeze every parameter of `model` except `trainable`; restore the original flags (and train/eval) on exit."""

    def __init__(self, model: nn.Module, trainable: Iterable[nn.Parameter]):
        self.model, self.trainable = model, list(trainable)

    def __enter__(self):
        self.flags = [(p, p.requires_grad) for p in self.model.parameters()]
        self.was_training = self.model.training
        ids = {id(p) for p in self.trainable}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in ids)
        return self

    def __exit__(self, *exc):
        for p, flag in self.flags:
            p.requires_grad_(flag)
        self.model.train(self.was_training)
        return False


@torch.no_grad()
def validation_loss(model: nn.Module, blocks, batch_size: int = 8) -> float:
    """Mean next-token loss of `model` over packed blocks (each block scored independently)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        ids = blocks[start : start + batch_size]["input_ids"].to(device)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        n = ids.shape[0] * (ids.shape[1] - 1)
        total, count = total + float(loss) * n, count + n
    model.train(was_training)
    return total / max(count, 1)


def _over_budget(args: TrainingArguments, state: dict) -> bool:
    # The budget counts training time only: validation passes are bookkeeping, not the method's cost.
    training_s = state["wall_clock_s"] - state.get("validation_s", 0.0)
    return args.max_seconds is not None and training_s >= args.max_seconds


def _latest_checkpoint(output_dir: Path) -> Path | None:
    found = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and (p / _STATE_FILE).is_file()]
    return max(found, key=lambda p: int(p.name.split("-")[1]), default=None)


def _sha256_of(tensors: Iterable[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(tensor_sha256(t).encode())
    return h.hexdigest()


def run_identity(
    model: nn.Module, params: list[nn.Parameter], data: BlockData, args: TrainingArguments, label: str, mixed: str
) -> dict[str, Any]:
    """What a run dir's weights depend on: the starting weights, the frozen model, the data and the
    hyper-parameters. A run dir records it when training starts; resuming with anything else is refused."""
    trainable = {id(p) for p in params}
    names = {id(p): n for n, p in model.named_parameters()}
    frozen = [p for p in model.parameters() if id(p) not in trainable]
    config = getattr(model, "config", None)
    return {
        "label": label,
        "trainable_parameters": [names[id(p)] for p in params],
        "initial_trainable_sha256": _sha256_of(params),
        "frozen_model_sha256": _sha256_of(frozen),
        "model_config_sha256": hashlib.sha256(config.to_json_string().encode()).hexdigest() if config else None,
        "train_data_sha256": _sha256_of([data.train[:]["input_ids"]]),
        "validation_data_sha256": _sha256_of([data.validation[:]["input_ids"]])
        if data.validation is not None
        else None,
        "hyper_parameters": {k: v for k, v in sorted(asdict(args).items()) if k not in _RESUMABLE_FIELDS}
        | {"mixed_precision": mixed},
    }


def _check_run_dir(output_dir: Path, identity: dict, args: TrainingArguments, is_main: bool) -> None:
    """Refuse a run dir started by another run; record this run's identity in a fresh one."""
    path = output_dir / _IDENTITY_FILE
    has_checkpoints = _latest_checkpoint(output_dir) is not None if output_dir.is_dir() else False
    if path.is_file() and args.resume:
        try:
            recorded = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
            raise CheckpointFormatError(f"{path} is unreadable ({err}); delete the run dir or pass another") from None
        recorded = json.loads(json.dumps(recorded))
        mine = json.loads(json.dumps(identity, default=str))
        differs = sorted(k for k in mine if recorded.get(k) != mine[k])
        if "hyper_parameters" in differs:
            hp_old, hp_new = recorded.get("hyper_parameters") or {}, mine["hyper_parameters"]
            differs.remove("hyper_parameters")
            differs += [f"{k} ({hp_old.get(k)!r} -> {hp_new[k]!r})" for k in hp_new if hp_old.get(k) != hp_new[k]]
        if differs:
            raise RunDirMismatchError(
                f"run dir {output_dir} holds a run started with other settings; differing: {', '.join(differs)}. "
                "Resuming it would mix two runs. Use a new run dir (--run-dir), delete this one, or pass "
                "resume=False (--no-resume) to start over in it"
            )
        return
    if has_checkpoints and args.resume:
        raise RunDirMismatchError(
            f"run dir {output_dir} holds checkpoints but no {_IDENTITY_FILE} saying which run wrote them, so "
            "resuming could mix two runs. Use a new run dir, or pass resume=False (--no-resume) to start over in it"
        )
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        tmp = output_dir / f".{_IDENTITY_FILE}.tmp"
        tmp.write_text(json.dumps(identity, indent=2, default=str))
        os.replace(tmp, path)


class _ForwardRestored:
    """accelerate's mixed precision wraps `model.forward` in autocast as an instance attribute; put it back."""

    _KEYS = ("forward", "_original_forward")

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.saved = {k: self.model.__dict__[k] for k in self._KEYS if k in self.model.__dict__}
        return self

    def __exit__(self, *exc):
        for key in self._KEYS:
            self.model.__dict__.pop(key, None)
        self.model.__dict__.update(self.saved)
        return False


def fit_parameters(
    model: nn.Module, params: list[nn.Parameter], data: BlockData, args: TrainingArguments, label: str = "training"
) -> TrainingMetrics:
    """The shared loop: train `params` of `model` (everything else frozen) on `data.train`; return metrics.

    Used by every not_hub training function, and by the benchmarks for baselines (peft LoRA, full fine-tuning),
    so all methods are trained by the same loop. Leaves the best validation weights in the model, and the model
    otherwise as it found it (requires_grad flags, train/eval mode, its own `forward`: no autocast wrapper).

    Raises:
        InvalidArgumentError: a field of `args` is out of range.
        RunDirMismatchError: `args.output_dir` holds a run started with another model, data or hyper-parameters.
        CheckpointFormatError: the run dir's newest checkpoint is unreadable.
    """
    args.validate()
    limit = context_length(getattr(model, "config", None))
    if limit is not None and data.block_size > limit:
        raise InvalidArgumentError(
            f"block_size={data.block_size} is longer than the model's context of {limit} tokens; pack the data with "
            f"block_size <= {limit}"
        )
    if args.mixed_precision is None:
        mixed = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    else:
        mixed = args.mixed_precision
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", mixed) != mixed:
        # accelerate keeps one process-wide state: a bf16 run followed by an fp32 one would be refused. Reset the
        # accelerator part only (the process group, device and rank stay).
        AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=mixed)
    names = {id(p): n for n, p in model.named_parameters()}
    param_names = [names[id(p)] for p in params]

    output_dir = Path(args.output_dir) if args.output_dir else None
    if output_dir is not None:
        identity = run_identity(model, params, data, args, label, mixed)
        _check_run_dir(output_dir, identity, args, accelerator.is_main_process)

    with _Frozen(model, params), _ForwardRestored(model):
        model.train()
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
        wrapped, optimizer = accelerator.prepare(model, optimizer)
        micro_per_epoch = math.ceil(len(data.train) / (args.batch_size * accelerator.num_processes))
        steps_per_epoch = max(1, math.ceil(micro_per_epoch / args.gradient_accumulation_steps))
        total_steps = (
            args.max_steps if args.max_steps is not None else max(1, math.ceil(steps_per_epoch * args.epochs))
        )
        scheduler = get_linear_schedule_with_warmup(optimizer, round(args.warmup_ratio * total_steps), total_steps)
        eval_every = args.eval_every or steps_per_epoch
        save_every = args.save_every or steps_per_epoch

        state = {
            "step": 0,
            "tokens_seen": 0,
            "best_validation_loss": None,
            "best_step": None,
            "train_loss": None,
            "wall_clock_s": 0.0,
            "history": [],
        }
        best: dict[str, torch.Tensor] | None = None
        checkpoint = _latest_checkpoint(output_dir) if output_dir and args.resume else None
        if checkpoint is not None:
            try:
                accelerator.load_state(str(checkpoint))
                state = json.loads((checkpoint / _STATE_FILE).read_text())
                scheduler.load_state_dict(state.pop("scheduler"))
                if (checkpoint / _BEST_FILE).is_file():
                    best = load_file(checkpoint / _BEST_FILE)
            except Exception as err:  # torch, safetensors and json each raise their own type for a damaged file
                raise CheckpointFormatError(
                    f"the checkpoint {checkpoint} in run dir {output_dir} cannot be read ({type(err).__name__}: "
                    f"{str(err).splitlines()[0][:200] if str(err) else ''}); delete it to resume from an earlier "
                    "one, or start over with resume=False (--no-resume) or another run dir"
                ) from None
            logger.warning("resuming %s from %s (step %d of %d)", label, checkpoint, state["step"], total_steps)

        def snapshot() -> dict[str, torch.Tensor]:
            return {n: p.detach().to("cpu", copy=True) for n, p in zip(param_names, params, strict=True)}

        def save_checkpoint() -> None:
            if output_dir is None:
                return
            accelerator.wait_for_everyone()
            target = output_dir / f"checkpoint-{state['step']}"
            tmp = output_dir / f".tmp-checkpoint-{state['step']}"
            tmp.mkdir(parents=True, exist_ok=True)
            accelerator.wait_for_everyone()
            accelerator.save_state(str(tmp))
            accelerator.wait_for_everyone()  # every process has written its part before the folder is renamed
            if accelerator.is_main_process:
                if best is not None:
                    save_file(best, tmp / _BEST_FILE)
                (tmp / _STATE_FILE).write_text(json.dumps({**state, "scheduler": scheduler.state_dict()}))
                if target.exists():
                    shutil.rmtree(target)
                os.replace(tmp, target)  # a kill mid-save never leaves a half-written checkpoint behind
                for old in output_dir.glob("checkpoint-*"):
                    if old != target:
                        shutil.rmtree(old, ignore_errors=True)
            accelerator.wait_for_everyone()

        def validate() -> None:
            nonlocal best
            if data.validation is None:
                return
            t_val = time.perf_counter()
            loss = validation_loss(accelerator.unwrap_model(wrapped), data.validation, args.batch_size)
            state["validation_s"] = state.get("validation_s", 0.0) + time.perf_counter() - t_val
            state["history"].append(
                {"step": state["step"], "validation_loss": loss, "train_loss": state["train_loss"]}
            )
            if state["best_validation_loss"] is None or loss < state["best_validation_loss"]:
                state["best_validation_loss"], state["best_step"] = loss, state["step"]
                best = snapshot()

        bar = tqdm(
            total=total_steps,
            initial=state["step"],
            desc=label,
            unit="step",
            disable=not (args.progress and accelerator.is_local_main_process),
        )
        t_start = time.perf_counter() - state["wall_clock_s"]
        if state["step"] == 0 and data.validation is not None:
            validate()  # the starting point counts: training must beat it to be kept
        state["wall_clock_s"] = time.perf_counter() - t_start
        while state["step"] < total_steps and not _over_budget(args, state):
            epoch, done_in_epoch = divmod(state["step"], steps_per_epoch)
            generator = torch.Generator().manual_seed(args.seed * 1000 + epoch)
            loader = DataLoader(
                data.train,
                batch_size=args.batch_size,
                sampler=RandomSampler(data.train, generator=generator),
                drop_last=False,
            )
            loader = accelerator.prepare_data_loader(loader, device_placement=True)
            if done_in_epoch:
                loader = accelerator.skip_first_batches(loader, done_in_epoch * args.gradient_accumulation_steps)
            t_tokens, t0 = 0, time.perf_counter()
            for batch in loader:
                ids = batch["input_ids"]
                with accelerator.accumulate(wrapped):
                    loss = wrapped(input_ids=ids, labels=ids, use_cache=False).loss
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and args.max_grad_norm:
                        accelerator.clip_grad_norm_(params, args.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
                t_tokens += ids.numel() * accelerator.num_processes
                if not accelerator.sync_gradients:
                    continue
                scheduler.step()
                state["step"] += 1
                state["tokens_seen"] += t_tokens
                mean_loss = float(accelerator.reduce(loss.detach(), reduction="mean"))
                ema = state["train_loss"]
                state["train_loss"] = mean_loss if ema is None else 0.9 * ema + 0.1 * mean_loss
                rate = t_tokens / max(time.perf_counter() - t0, 1e-9)
                t_tokens, t0 = 0, time.perf_counter()
                bar.update(1)
                bar.set_postfix(loss=f"{state['train_loss']:.3f}", tok_s=f"{rate:,.0f}")
                state["wall_clock_s"] = time.perf_counter() - t_start
                if state["step"] % eval_every == 0 or state["step"] == total_steps:
                    validate()
                if state["step"] % save_every == 0 or state["step"] == total_steps:
                    save_checkpoint()
                if state["step"] >= total_steps or _over_budget(args, state):
                    break
        bar.close()
        if data.validation is not None and (not state["history"] or state["history"][-1]["step"] != state["step"]):
            validate()  # stopped between validations (time budget): the last weights compete too
        state["wall_clock_s"] = time.perf_counter() - t_start
        if best is not None:  # keep the best validation weights
            with torch.no_grad():
                for name, p in zip(param_names, params, strict=True):
                    p.copy_(best[name].to(p.device, p.dtype))
        accelerator.free_memory()
    return TrainingMetrics(
        steps=state["step"],
        epochs=args.epochs if not args.max_steps else state["step"] / steps_per_epoch,
        tokens_seen=state["tokens_seen"],
        lr=args.lr,
        warmup_ratio=args.warmup_ratio,
        batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        num_processes=accelerator.num_processes,
        mixed_precision=mixed,
        seed=args.seed,
        final_train_loss=state["train_loss"],
        best_validation_loss=state["best_validation_loss"],
        best_step=state["best_step"],
        wall_clock_s=round(state["wall_clock_s"], 2),
        validation_s=round(state.get("validation_s", 0.0), 2),
        history=state["history"],
    )


def train_organ(
    organ,
    donor: nn.Module,
    data: BlockData,
    *,
    method: str = DEFAULT_METHOD,
    args: TrainingArguments | None = None,
    cache_prefix: bool = True,
    cache_memory_limit: int = DEFAULT_MEMORY_LIMIT,
    prefix_cache: PrefixCache | None = None,
    radius: int = 1,
    **kwargs: Any,
) -> TrainingMetrics:
    """Train an organ's layers; only organ weights get gradients, the donor is left bit-identical.

    Args:
        organ: the `OrganModel` to train (in place).
        donor: the model the organ came from (its frozen embeddings, final norm and LM head are used, not copied).
        data: packed blocks (`not_hub.data.make_blocks`).
        method: "standalone" (the paper: embeddings -> organ -> final norm -> LM head), "in_situ" (the organ at
            its own slot inside the frozen donor, every other weight frozen), or "recovered" (standalone for the
            first half of the epochs / steps / seconds, then recovery of the organ and `radius` neighbours on each
            side at its slot in the donor for the second half; the organ then *carries* those neighbours: it grows
            into the block `transplant.to_organ()` exports, grafted back by default with a splice).
        radius: with method="recovered", the neighbouring layers recovered on each side.
        cache_prefix: in situ, run the frozen layers below the organ once per block and reuse their output every
            epoch (`not_hub.prefix_cache`); the losses equal the uncached run's within float tolerance. A
            wall-clock budget (`max_seconds`) counts the time spent building the cache.
        cache_memory_limit: bytes of cached hidden states kept in memory (hidden_size * 4 per token in fp32); a
            larger cache is written to a memory-mapped safetensors file (in `output_dir`, else a temp folder).
        prefix_cache: in situ, a `PrefixCache` already built from this donor at the organ's slot over these blocks
            (e.g. shared by the runs of a learning-rate sweep); it is checked (same slot, same unchanged frozen
            weights, every block covered: else `InvalidArgumentError`, nothing trained) and its build time is not
            counted again.
        args / kwargs: `TrainingArguments` (kwargs override fields, e.g. `epochs=1, lr=3e-4`).

    Returns:
        The training metrics, also written to `organ.config.training` (data description, tokens seen, steps, lr,
        final train loss, best validation loss, wall-clock).

    Example:
        ```python
        >>> metrics = not_hub.train_organ(organ, donor, blocks, epochs=1, output_dir="runs/organ")
        ```
    """
    if method not in METHODS:
        raise InvalidArgumentError(f"method={method!r} is not a training method; expected one of {METHODS}")
    args = _args(args, kwargs)
    # The organ must fit the donor, exactly as a transplant would require: a llama organ inside qwen2's embeddings
    # and head would train (shapes may even agree) and be saved as if nothing were wrong.
    report = check_compatibility(organ, donor)
    if not report.compatible:
        raise IncompatibleOrganError(
            f"organ {organ.name_or_path or '(unsaved)'} does not fit the donor {donor.config.model_type} model "
            f"{getattr(donor, 'name_or_path', '') or ''}: {', '.join(r.field for r in report.blocking)} differ. Train "
            "an organ inside the model it was cut from (or one of the same architecture and size)",
            report,
        )
    depth = donor.config.num_hidden_layers
    start, stop = organ.config.layer_range
    if method == "in_situ" and stop > depth:
        raise InvalidArgumentError(
            f"in-situ training puts the organ back at its donor slot [{start}, {stop}), which a {depth}-layer donor "
            "does not have; use method='standalone' or the model the organ was cut from"
        )
    torch.manual_seed(args.seed)
    if method == "standalone":
        shell = standalone_shell(organ, donor)
        metrics = fit_parameters(shell, list(organ.parameters()), data, args, "organ (standalone)")
    elif method == "recovered":
        metrics = _train_recovered(organ, donor, data, args, radius)
    else:
        cache_info = None
        # At the organ's own slot (its default transplant: a replace at its donor start, or, for an organ carrying
        # recovered neighbours, the splice that puts the whole block back).
        with organ.transplanted(donor) as transplant:
            start = transplant.plan.position
            params = [p for layer in transplant.layers for p in layer.parameters()]
            model, label = donor, "organ (in situ)"
            dropout = prefix_dropout(donor, start) if cache_prefix and start > 0 else None
            if dropout:
                logger.warning(
                    "not caching the layers below the organ: %s is active in training mode, so a cached prefix "
                    "would change the result; training in situ without the cache",
                    dropout,
                )
                cache_info = {"skipped": f"dropout below the organ: {dropout}"}
            elif prefix_cache is not None or (cache_prefix and start > 0):
                t0 = time.perf_counter()
                blocks = blocks_to_cache(data)
                if prefix_cache is not None:  # built elsewhere (and paid for there): checked, not rebuilt
                    prefix_cache.check_reuse(donor, start, blocks)
                    cache = prefix_cache
                else:
                    cache = PrefixCache.build(
                        donor,
                        start,
                        blocks,
                        batch_size=args.batch_size,
                        memory_limit=cache_memory_limit,
                        cache_dir=Path(args.output_dir) / "prefix_cache" if args.output_dir else None,
                    )
                    if args.max_seconds is not None:  # building the cache is part of the method's cost
                        args.max_seconds = max(0.0, args.max_seconds - (time.perf_counter() - t0))
                model, label = CachedPrefixModel(donor, cache), "organ (in situ, cached prefix)"
                cache_info = {
                    "layers": [0, start],
                    "bytes": cache.nbytes,
                    "bytes_per_token": cache.bytes_per_token,
                    "storage": "memory-mapped safetensors" if cache.path else "memory",
                    "build_s": 0.0 if prefix_cache is not None else round(time.perf_counter() - t0, 2),
                    **({"reused": True} if prefix_cache is not None else {}),
                }
            metrics = fit_parameters(model, params, data, args, label)
            organ.load_state_dict(transplant.to_organ().state_dict())
    organ.eval()
    organ.config.training = {"method": method, "data": data.description, **metrics.to_dict()}
    if method == "in_situ":
        organ.config.training["prefix_cache"] = cache_info
    return metrics


def _halves(args: TrainingArguments) -> tuple[TrainingArguments, TrainingArguments]:
    """Split a run's length (epochs, steps, seconds) in two; each half checkpoints in its own sub-folder."""
    first, second = TrainingArguments(**asdict(args)), TrainingArguments(**asdict(args))
    for half, name in ((first, "standalone"), (second, "recovery")):
        half.epochs = args.epochs / 2
        half.max_steps = max(1, args.max_steps // 2) if args.max_steps is not None else None
        half.max_seconds = args.max_seconds / 2 if args.max_seconds is not None else None
        half.output_dir = str(Path(args.output_dir) / name) if args.output_dir else None
    return first, second


def _train_recovered(organ, donor: nn.Module, data: BlockData, args: TrainingArguments, radius: int):
    first, second = _halves(args)
    m1 = fit_parameters(standalone_shell(organ, donor), list(organ.parameters()), data, first, "organ (standalone)")
    with organ.transplanted(donor) as transplant:
        m2 = recover(donor, transplant, data, radius=radius, args=second)
        block = transplant.to_organ()
    organ.carry(block)
    return TrainingMetrics(
        **{
            **m2.to_dict(),
            "steps": m1.steps + m2.steps,
            "epochs": m1.epochs + m2.epochs,
            "tokens_seen": m1.tokens_seen + m2.tokens_seen,
            "wall_clock_s": round(m1.wall_clock_s + m2.wall_clock_s, 2),
            "validation_s": round(m1.validation_s + m2.validation_s, 2),
            "history": [{**h, "phase": "standalone"} for h in m1.history]
            + [{**h, "phase": "recovery"} for h in m2.history],
        }
    )


def recover(
    recipient: nn.Module,
    transplant: Transplant | list[Transplant],
    data: BlockData,
    *,
    radius: int = 1,
    args: TrainingArguments | None = None,
    **kwargs: Any,
) -> TrainingMetrics:
    """Recovery fine-tuning: train the transplanted organ(s) and `radius` neighbouring layers on each side.

    With several transplants (a list), they are recovered jointly in one run: every organ and every neighbour
    trains together. Everything else in the recipient stays frozen. The neighbours' weights before recovery are
    kept in the transplant that owns them, so `explant()` still restores the recipient bit-exactly, in any order.
    Paper: 3-5 epochs.

    Returns:
        The training metrics, also stored in each transplant's entry (and so in `recipient.config.transplants`).

    Raises:
        InvalidArgumentError: `radius` is negative or not an integer, or a training argument is out of range.
        TransplantStateError: a transplant was already explanted or belongs to another model.
    """
    transplants = [transplant] if isinstance(transplant, Transplant) else list(transplant)
    if isinstance(radius, bool) or not isinstance(radius, int) or radius < 0:
        raise InvalidArgumentError(f"radius={radius!r} is not allowed; expected an integer >= 0 (layers per side)")
    if not transplants:
        raise InvalidArgumentError("recover() needs at least one transplant")
    for t in transplants:
        if not t.active or t.recipient is not recipient:
            raise TransplantStateError(
                "recover() needs live transplants of this recipient; one was explanted or belongs to another model"
            )
    args = _args(args, {"epochs": 3.0, **kwargs})
    torch.manual_seed(args.seed)
    # A neighbour that is another organ's layer trains as that organ's layer; it is not backed up as a neighbour
    # (its owner's explant takes it out), so explant order never undoes another organ's recovery.
    organ_layers = {id(layer) for t in transplants for layer in t.layers}
    trained, seen = [], set()
    for t in transplants:
        neighbours = [layer for layer in t.neighbour_layers(radius) if id(layer) not in organ_layers]
        t.backup_neighbours(neighbours)
        for layer in [*t.layers, *neighbours]:
            if id(layer) not in seen:
                seen.add(id(layer))
                trained.append(layer)
    params = [p for layer in trained for p in layer.parameters()]
    label = f"recovery (radius {radius}" + (f", {len(transplants)} organs jointly)" if len(transplants) > 1 else ")")
    metrics = fit_parameters(recipient, params, data, args, label)
    recipient.eval()
    for t in transplants:
        t.entry["recovery"] = {"radius": radius, "joint": len(transplants), **metrics.to_dict(history=False)}
    return metrics


def train_bridges(
    recipient: nn.Module,
    transplant: Transplant,
    data: BlockData,
    *,
    args: TrainingArguments | None = None,
    **kwargs: Any,
) -> TrainingMetrics:
    """Train only the bridges of a `mode="bridge"` transplant (the organ and the recipient stay frozen)."""
    if transplant.mode != "bridge":
        raise InvalidModeError(
            f"this transplant has mode={transplant.mode!r}; bridges exist only with transplant_into(..., mode='bridge')"
        )
    args = _args(args, kwargs)
    torch.manual_seed(args.seed)
    params = [p for bridge in transplant.bridges for p in bridge.parameters()]
    metrics = fit_parameters(recipient, params, data, args, "bridges")
    recipient.eval()
    transplant.entry["bridge_training"] = metrics.to_dict(history=False)
    return metrics
