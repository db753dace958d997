"""The hand-written training loop not_hub used before it moved onto `transformers.Trainer` (commit 57d9e7f), kept
verbatim for one purpose: `benchmarks/speed.py --loop` measures the Trainer-based loop against it in the same run.
Not part of the library; nothing imports it but that benchmark.
"""

# ruff: noqa
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


logger = logging.getLogger(__name__)

from not_hub.architectures import context_length
from not_hub.data import BlockData
from not_hub.errors import CheckpointFormatError, InvalidArgumentError, RunDirMismatchError, UnexpectedArgumentError
from not_hub.integrity import tensor_sha256

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
