"""Training on `transformers.Trainer`: standalone organ training (the paper), in-situ training, recovery, bridges.

All four share one entry point (`fit_parameters`, public for baselines such as LoRA), which runs the field's own
`transformers.Trainer` (`not_hub.trainer`): AdamW, warmup then linear decay (over the time budget when there is
one), gradient accumulation, mixed precision where the hardware has it, multi-process via `accelerate launch`,
trackers, a progress bar with loss and tokens/s, periodic validation with the best weights kept, and resumable
checkpoints (a run killed mid-way and resumed reaches the same weights as an uninterrupted run). A run dir records
which run it belongs to and refuses another. Only the parameters being trained get gradients; every other weight
is left bit-identical. To train an organ with your own `Trainer` (or TRL's), use `not_hub.get_organ_model`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .architectures import context_length
from .atomic import describe_os_error
from .data import BlockData, pack_blocks
from .errors import (
    CheckpointFormatError,
    DistributedSetupError,
    IncompatibleOrganError,
    InvalidArgumentError,
    InvalidModeError,
    OutputPathError,
    RunDirInUseError,
    RunDirMismatchError,
    TransplantStateError,
    UnexpectedArgumentError,
)
from .integrity import tensor_sha256
from .precision import CHOICES as PRECISIONS
from .precision import resolve_mixed_precision
from .prefix_cache import DEFAULT_DISK_LIMIT, DEFAULT_MEMORY_LIMIT, CachedPrefixModel, PrefixCache, prefix_dropout
from .shells import standalone_shell
from .signature import Signature, SignatureCollector
from .trainer import finished_checkpoints, process_state, run_trainer
from .transplant import Transplant, check_compatibility

logger = logging.getLogger(__name__)

METHODS = ("standalone", "in_situ", "recovered")
# The organ trained at its slot inside the frozen donor: the method the learning-curve protocol (benchmarks/curves.py)
# measures for the replacing organ; the paper's "standalone" is one argument away.
DEFAULT_METHOD = "in_situ"
# Peak learning rates when none is given: the median validation choices of an earlier benchmark over four domains,
# and what the learning-curve protocol (benchmarks/curves.py, rates chosen on validation at 2 minutes) chose again on
# code and legal text: in situ 1e-3, LoRA r=8 3e-3 (r=64: 1e-3); full fine-tuning 3e-4 (code) and 1e-4 (legal). The
# standalone wrapper 1e-4 (the paper's rate, which suits only it); recovery and bridges 1e-3, as in situ.
DEFAULT_LR = {
    "standalone": 1e-4,
    "in_situ": 1e-3,
    "recovered": 1e-3,
    "recovery": 1e-3,
    "bridges": 1e-3,
    "lora": 3e-3,
    "full": 3e-4,
}
_IDENTITY_FILE = "run_identity.json"


@dataclass
class OrganTrainingArguments:
    """Hyper-parameters of a not_hub training run, mapped onto `transformers.TrainingArguments` underneath.

    Defaults are for a corpus seen about once: one epoch, the method's learning rate (`DEFAULT_LR`), 5% warmup then
    linear decay to 0. With a budget (`max_seconds`, `max_tokens`, `max_steps`) the schedule is laid out over the
    budget, so warmup and decay complete within it whichever binds first.

    Args:
        epochs: passes over the training blocks (a streamed corpus: passes over the stream).
        lr: peak learning rate (None: the method's default, `DEFAULT_LR`).
        warmup_ratio: share of the run (steps, or of the time budget) with linear warmup (then linear decay to 0).
        weight_decay: AdamW weight decay.
        batch_size: blocks per process per micro-batch.
        gradient_accumulation_steps: micro-batches per optimizer step.
        max_grad_norm: gradient clipping (None: off).
        max_steps: stop after this many optimizer steps (the schedule is laid out for them).
        max_tokens: stop once this many training tokens were seen, all processes together (becomes a step count).
        max_seconds: stop once training (validation excluded) has run this long; the schedule follows the budget.
        eval_every: validate every N optimizer steps (default: once per epoch, or every 100 steps on a stream);
            the best weights are kept.
        eval_at_seconds: also validate once training time (validation excluded) passes each of these marks, e.g.
            `[60, 120, 300, 600, 1200]` for a learning curve in minutes; each history entry records the step, the
            training seconds and the tokens seen.
        save_every: write a resumable checkpoint every N optimizer steps into `output_dir` (default: eval_every).
        output_dir: where checkpoints go; `None` trains without checkpoints.
        resume: continue from the newest complete checkpoint in `output_dir` if there is one; False starts over
            (the old run's identity and checkpoints are replaced before anything else).
        seed: seeds the data order and initialisation-free randomness.
        mixed_precision: "auto" (the default: bf16 autocast where the GPU or CPU does bf16 natively, float32
            elsewhere; `ACCELERATE_MIXED_PRECISION`, set by `accelerate launch`, first: see `not_hub.precision`),
            or "no", "bf16", "fp16" to force it. The run's choice is recorded in the organ's training metadata.
        progress: show a progress bar (main process only).
        report_to: trackers, as in `transformers.TrainingArguments` ("none", "tensorboard", "wandb", ...).
        gradient_checkpointing: recompute activations in the backward pass (less memory, more compute).
        trainer_args: further `transformers.TrainingArguments` fields, applied last (e.g. `{"fsdp": "full_shard"}`,
            `{"deepspeed": "ds.json"}`, `{"optim": "adamw_torch_fused"}`).
    """

    epochs: float = 1.0
    lr: float | None = None
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = 1.0
    max_steps: int | None = None
    max_tokens: int | None = None
    max_seconds: float | None = None
    eval_every: int | None = None
    eval_at_seconds: list[float] | None = None
    save_every: int | None = None
    output_dir: str | None = None
    resume: bool = True
    seed: int = 0
    mixed_precision: str | None = "auto"
    progress: bool = True
    report_to: str | list[str] = "none"
    gradient_checkpointing: bool = False
    trainer_args: dict[str, Any] | None = None

    def validate(self) -> OrganTrainingArguments:
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
        check("lr", self.lr is None or number("lr", self.lr) > 0, "a learning rate > 0, or None (the default)")
        check("warmup_ratio", 0 <= number("warmup_ratio", self.warmup_ratio) < 1, "0 <= warmup_ratio < 1")
        check("weight_decay", number("weight_decay", self.weight_decay) >= 0, "weight_decay >= 0")
        check("batch_size", number("batch_size", self.batch_size, integer=True) >= 1, "batch_size >= 1")
        check(
            "gradient_accumulation_steps",
            number("gradient_accumulation_steps", self.gradient_accumulation_steps, integer=True) >= 1,
            "gradient_accumulation_steps >= 1",
        )
        for name in ("max_steps", "max_tokens", "eval_every", "save_every"):
            value = getattr(self, name)
            check(name, value is None or number(name, value, integer=True) >= 1, f"{name} >= 1, or None")
        marks = self.eval_at_seconds
        check(
            "eval_at_seconds",
            marks is None
            or (
                isinstance(marks, (list, tuple))
                and all(number("eval_at_seconds", m) > 0 for m in marks)
                and list(marks) == sorted(marks)
            ),
            "an increasing list of seconds > 0, or None",
        )
        check(
            "max_grad_norm",
            self.max_grad_norm is None or number("max_grad_norm", self.max_grad_norm) > 0,
            "max_grad_norm > 0, or None (no clipping)",
        )
        check(
            "max_seconds",
            self.max_seconds is None or number("max_seconds", self.max_seconds) > 0,
            "max_seconds > 0 (a budget of 0 s trains nothing), or None (no budget)",
        )
        check("seed", 0 <= number("seed", self.seed, integer=True) < 2**32, "an integer in [0, 2**32)")
        check(
            "mixed_precision",
            self.mixed_precision in (None, *PRECISIONS),
            "'auto' (bf16 where the GPU or CPU does it natively, else no), 'no', 'bf16' or 'fp16'",
        )
        check("trainer_args", self.trainer_args is None or isinstance(self.trainer_args, dict), "a dict, or None")
        from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

        trackers = [self.report_to] if isinstance(self.report_to, str) else self.report_to
        known = {"none", "all", *INTEGRATION_TO_CALLBACK}
        check(
            "report_to",
            isinstance(trackers, (list, tuple)) and all(isinstance(t, str) and t in known for t in trackers),
            f"'none', 'all' or trackers among {sorted(INTEGRATION_TO_CALLBACK)}",
        )
        return self


# Fields that may change between a run and its resumption (they do not change what the weights become).
_RESUMABLE_FIELDS = frozenset({"output_dir", "resume", "progress", "max_seconds", "report_to", "eval_at_seconds"})


def _args(args: OrganTrainingArguments | None, kwargs: dict, *, lr: float | None = None) -> OrganTrainingArguments:
    if args is not None and not isinstance(args, OrganTrainingArguments):
        raise InvalidArgumentError(
            f"args={type(args).__name__} is not an OrganTrainingArguments; pass not_hub.OrganTrainingArguments(...) "
            "(its trainer_args take any transformers.TrainingArguments field), or train with transformers.Trainer "
            "on not_hub.get_organ_model(organ, model)"
        )
    args = OrganTrainingArguments(**asdict(args)) if args is not None else OrganTrainingArguments()
    for key, value in kwargs.items():
        if not hasattr(args, key):
            raise UnexpectedArgumentError(
                f"unknown training argument {key!r}; see not_hub.OrganTrainingArguments (trainer_args= passes "
                "transformers.TrainingArguments fields)"
            )
        setattr(args, key, value)
    if args.lr is None and lr is not None:
        args.lr = lr
    return args.validate()


@dataclass
class TrainingMetrics:
    """What a training run did, returned by every training function (and stored, as a dict, in the organ's config).

    Attributes:
        steps: optimizer steps taken. epochs: passes over the training blocks (fractional with a budget).
        tokens_seen: training tokens, all processes together. wall_clock_s: training time including validation;
        validation_s: the validation part. first_step_s: training time until the first optimizer step had finished.
        final_train_loss: an EMA of the training loss. best_validation_loss / best_step: the kept weights'
        validation loss and step (None without validation data). history: one entry per validation. The rest echo
        the run's settings.
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
    first_step_s: float | None = None

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
        self.checkpointing = _checkpointing(self.model)
        config = getattr(self.model, "config", None)
        self.use_cache = config.__dict__.get("use_cache", _MISSING) if config is not None else _MISSING
        ids = {id(p) for p in self.trainable}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in ids)
        return self

    def __exit__(self, *exc):
        for p, flag in self.flags:
            p.requires_grad_(flag)
        self.model.train(self.was_training)
        if _checkpointing(self.model) and not self.checkpointing:
            disable = getattr(self.model, "activation_checkpointing_disable", None)
            (disable or self.model.gradient_checkpointing_disable)()
        if self.use_cache is not _MISSING:  # Trainer turns the KV cache off for training; the model keeps its own
            self.model.config.use_cache = self.use_cache
        return False


_MISSING = object()


def _checkpointing(model: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


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


def _sha256_of(tensors: Iterable[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(tensor_sha256(t).encode())
    return h.hexdigest()


def _data_sha256(dataset, description: dict) -> str | None:
    if dataset is None:
        return None
    if hasattr(dataset, "__len__"):
        return _sha256_of([dataset[:]["input_ids"]])
    # A stream is not read twice to name it: its description (sources, sizes, split, seed) stands for it.
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()


def run_identity(
    model: nn.Module,
    params: list[nn.Parameter],
    data: BlockData,
    args: OrganTrainingArguments,
    label: str,
    mixed: str,
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
        "train_data_sha256": _data_sha256(data.train, data.description),
        "validation_data_sha256": _data_sha256(data.validation, data.description),
        "hyper_parameters": {k: v for k, v in sorted(asdict(args).items()) if k not in _RESUMABLE_FIELDS}
        | {"mixed_precision": mixed},
    }


def _check_run_dir(output_dir: Path, identity: dict, args: OrganTrainingArguments, is_main: bool) -> None:
    """Refuse a run dir started by another run; record this run's identity in a fresh one.

    Starting over (`resume=False`) replaces the identity *first* and only then deletes the old checkpoints, so a
    kill at any point leaves either the old run whole or a run dir that names the new run: never one run's
    checkpoints under another's identity.
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputPathError(f"run dir {str(output_dir)!r} is an existing file; pass a folder (--run-dir)")
    path = output_dir / _IDENTITY_FILE
    has_checkpoints = bool(finished_checkpoints(output_dir)) if output_dir.is_dir() else False
    if path.is_file() and args.resume:
        try:
            recorded = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError, RecursionError) as err:
            raise CheckpointFormatError(f"{path} is unreadable ({err}); delete the run dir or pass another") from None
        if not isinstance(recorded, dict):
            raise CheckpointFormatError(
                f"{path} holds a JSON {type(recorded).__name__}, not the run's identity; delete the run dir or pass "
                "another"
            )
        recorded = json.loads(json.dumps(recorded, default=str))
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
    elif has_checkpoints and args.resume:
        raise RunDirMismatchError(
            f"run dir {output_dir} holds checkpoints but no {_IDENTITY_FILE} saying which run wrote them, so "
            "resuming could mix two runs. Use a new run dir, or pass resume=False (--no-resume) to start over in it"
        )
    elif is_main:
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            tmp = output_dir / f".{_IDENTITY_FILE}.tmp"
            tmp.write_text(json.dumps(identity, indent=2, default=str))
            os.replace(tmp, path)  # this run's identity first ...
        except OSError as err:
            raise OutputPathError(
                f"run dir {str(output_dir)!r} cannot be written: {describe_os_error(err)}; pass another output_dir "
                "(--run-dir)"
            ) from None
        for old in output_dir.glob("checkpoint-*"):  # ... then the old run's checkpoints go
            shutil.rmtree(old, ignore_errors=True)
    process_state().wait_for_everyone()  # every process passes here exactly once


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


@contextlib.contextmanager
def _run_dir_lock(output_dir: Path | None, is_main: bool):
    """Hold the run dir for this run (an OS lock on a file in it, released by the OS even if the process dies): a
    second run started in the same dir while this one trains is refused at once, instead of both writing it."""
    if output_dir is None or not is_main:
        yield
        return
    import fcntl

    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        handle = open(output_dir / ".lock", "a+")  # noqa: SIM115  (held for the run)
    except OSError as err:
        raise OutputPathError(
            f"run dir {str(output_dir)!r} cannot be written: {describe_os_error(err)}; pass another output_dir "
            "(--run-dir)"
        ) from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirInUseError(
                f"run dir {output_dir} is in use by another training process right now; wait for it to finish, or "
                "pass another output_dir (--run-dir)"
            ) from None
        yield
    finally:
        handle.close()  # (closing releases the lock)


def _check_launch(processes) -> None:
    """Refuse a launch whose processes do not form one group, and say when accelerate runs something other than the
    FSDP the launch asked for (accelerate 1.x shards with FSDP only on accelerators: on CPUs it runs DDP)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and processes.num_processes == 1:
        raise DistributedSetupError(
            f"this is one of {world} launched processes (WORLD_SIZE={world}), but accelerate sees a single process, so "
            "each would train alone and write the same run dir. On CPUs, launch with ACCELERATE_USE_CPU=1 "
            "accelerate launch --multi_gpu --num_processes N (DDP over gloo); an FSDP config without GPUs starts "
            "processes that never join (accelerate shards with FSDP only on accelerators)"
        )
    fsdp_asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if fsdp_asked and str(processes.distributed_type).split(".")[-1] != "FSDP":
        logger.warning(
            "the launch asked for FSDP, but accelerate runs %s: no parameter is sharded (accelerate 1.x uses FSDP "
            "only on accelerators; on CPUs the model is replicated in every process, as with DDP)",
            processes.distributed_type,
        )


def _steps(data: BlockData, args: OrganTrainingArguments, num_processes: int) -> tuple[int, int | None]:
    """(optimizer steps the run is laid out for, steps per epoch or None for a stream of unknown length)."""
    per_step = args.batch_size * args.gradient_accumulation_steps * num_processes
    limits = []
    steps_per_epoch = None
    if hasattr(data.train, "__len__"):
        micro_per_epoch = math.ceil(len(data.train) / (args.batch_size * num_processes))
        steps_per_epoch = max(1, math.ceil(micro_per_epoch / args.gradient_accumulation_steps))
        limits.append(max(1, math.ceil(steps_per_epoch * args.epochs)))
    if args.max_steps is not None:
        limits.append(args.max_steps)
    if args.max_tokens is not None:
        limits.append(max(1, math.ceil(args.max_tokens / (per_step * data.block_size))))
    if not limits and args.max_seconds is not None:
        limits.append(10**9)  # a stream under a time budget: the clock stops it, and the stream's end
    if not limits:
        raise InvalidArgumentError(
            "a streamed corpus has no known length, so the run cannot be laid out; pass max_tokens (--max-tokens), "
            "max_seconds (--max-seconds) or max_steps (--max-steps)"
        )
    return min(limits), steps_per_epoch


def fit_parameters(
    model: nn.Module,
    params: list[nn.Parameter],
    data: BlockData,
    args: OrganTrainingArguments,
    label: str = "training",
) -> TrainingMetrics:
    """Train `params` of `model` (everything else frozen) on `data.train` with `transformers.Trainer`.

    Used by every not_hub training function, and by the benchmarks for baselines (peft LoRA, full fine-tuning),
    so all methods are trained by the same loop. Leaves the best validation weights in the model, and the model
    otherwise as it found it (requires_grad flags, train/eval mode, its own `forward`: no autocast wrapper).

    Raises:
        InvalidArgumentError: a field of `args` is out of range (a missing `lr` included).
        RunDirMismatchError: `args.output_dir` holds a run started with another model, data or hyper-parameters.
        CheckpointFormatError: the run dir's newest checkpoint is unreadable.
    """
    args.validate()
    if args.lr is None:
        raise InvalidArgumentError("lr=None: fit_parameters needs a learning rate (e.g. not_hub.DEFAULT_LR['lora'])")
    limit = context_length(getattr(model, "config", None))
    if limit is not None and data.block_size > limit:
        raise InvalidArgumentError(
            f"block_size={data.block_size} is longer than the model's context of {limit} tokens; pack the data with "
            f"block_size <= {limit}"
        )
    mixed = resolve_mixed_precision(args.mixed_precision)
    processes = process_state()
    num_processes = processes.num_processes
    _check_launch(processes)
    total_steps, steps_per_epoch = _steps(data, args, num_processes)
    eval_every = args.eval_every or steps_per_epoch or 100
    output_dir = Path(args.output_dir) if args.output_dir else None
    if output_dir is not None and output_dir.exists() and not output_dir.is_dir():
        raise OutputPathError(f"run dir {str(output_dir)!r} is an existing file; pass a folder (--run-dir)")
    validate = None
    if data.validation is not None:
        validate = lambda: validation_loss(model, data.validation, args.batch_size)  # noqa: E731
    with _run_dir_lock(output_dir, processes.is_main_process), _Frozen(model, params), _ForwardRestored(model):
        if output_dir is not None:  # (under the lock: a second run never reads or writes the dir meanwhile)
            identity = run_identity(model, params, data, args, label, mixed)
            _check_run_dir(output_dir, identity, args, processes.is_main_process)
        model.train()
        state = run_trainer(
            model,
            params,
            data,
            args,
            label=label,
            mixed=mixed,
            output_dir=output_dir,
            max_steps=total_steps,
            eval_every=eval_every,
            validate=validate,
        )
    budget_spent = args.max_seconds is not None and state["wall_clock_s"] >= 0.95 * args.max_seconds
    stream_ended = data.streamed and state["step"] < total_steps and not budget_spent
    if stream_ended and args.max_tokens and state["tokens_seen"] < 0.9 * args.max_tokens:
        logger.warning(
            "the stream ended after %s tokens, %.0f%% of max_tokens=%s: the learning-rate schedule was laid over "
            "max_tokens, so it stopped early (warmup or decay unfinished); pass a max_tokens near the corpus's size",
            f"{state['tokens_seen']:,}", 100 * state["tokens_seen"] / args.max_tokens,
            f"{args.max_tokens:,}",
        )  # fmt: skip
    return TrainingMetrics(
        steps=state["step"],
        epochs=(state["step"] / steps_per_epoch) if steps_per_epoch else state["step"] / max(total_steps, 1),
        tokens_seen=state["tokens_seen"],
        lr=args.lr,
        warmup_ratio=args.warmup_ratio,
        batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        num_processes=state["num_processes"],
        mixed_precision=mixed,
        seed=args.seed,
        final_train_loss=state["train_loss"],
        best_validation_loss=state["best_validation_loss"],
        best_step=state["best_step"],
        wall_clock_s=round(state["wall_clock_s"], 2),
        validation_s=round(state["validation_s"], 2),
        history=state["history"],
        first_step_s=round(state["first_step_s"], 3) if state["first_step_s"] is not None else None,
    )


def train_organ(
    organ,
    donor: nn.Module,
    data: BlockData,
    *,
    method: str = DEFAULT_METHOD,
    args: OrganTrainingArguments | None = None,
    cache_prefix: bool = True,
    cache_memory_limit: int = DEFAULT_MEMORY_LIMIT,
    cache_disk_limit: int = DEFAULT_DISK_LIMIT,
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
        cache_prefix: in situ, keep the output of the frozen layers below the organ for each block the first time
            training (or validation) visits it, and reuse it on later visits (`not_hub.prefix_cache`): there is no
            pass before the first step, the first epoch costs what the uncached run costs, and the losses equal the
            uncached run's within float tolerance.
        cache_memory_limit / cache_disk_limit: bytes of cached hidden states kept in memory, then in an anonymous
            temporary file (deleted by the OS when the process ends, even on a crash); blocks beyond both are
            recomputed, not cached. A token costs `hidden_size * 4` bytes in fp32.
        prefix_cache: in situ, a `PrefixCache` of this donor at the organ's slot (e.g. shared by the runs of a
            learning-rate sweep); it is checked (same slot, same unchanged frozen weights: else
            `InvalidArgumentError`, nothing trained), and what it already holds is reused.
        args / kwargs: `OrganTrainingArguments` (kwargs override fields, e.g. `max_seconds=120, lr=3e-4`); the
            learning rate defaults to the method's (`DEFAULT_LR`).

    Returns:
        The training metrics, also written to `organ.config.training` (data description, tokens seen, steps, lr,
        final train loss, best validation loss, wall-clock).

    Example:
        ```python
        >>> metrics = not_hub.train_organ(organ, donor, blocks, max_seconds=120, output_dir="runs/organ")
        ```
    """
    if method not in METHODS:
        raise InvalidArgumentError(f"method={method!r} is not a training method; expected one of {METHODS}")
    args = _args(args, kwargs, lr=DEFAULT_LR[method] if method in DEFAULT_LR else None)
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
    if method in ("standalone", "recovered"):
        # These train the organ's own weights in place: an error or Ctrl-C part-way must leave the organ as it was
        # (untrained, with no training metadata), not half-trained and unlabelled. (A run dir keeps the checkpoints.)
        before = {k: v.detach().clone() for k, v in organ.state_dict().items()}
        try:
            if method == "standalone":
                shell = standalone_shell(organ, donor)
                metrics = fit_parameters(shell, list(organ.parameters()), data, args, "organ (standalone)")
            else:
                metrics = _train_recovered(organ, donor, data, args, radius)
        except BaseException:
            with torch.no_grad():
                organ.load_state_dict(before)
            raise
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
                if prefix_cache is not None:  # shared with other runs: checked, and what it holds is reused
                    prefix_cache.check_reuse(donor, start)
                    cache = prefix_cache
                else:
                    cache = PrefixCache(
                        donor, start, memory_limit=cache_memory_limit, disk_limit=cache_disk_limit, shared=False
                    )
                model, label = CachedPrefixModel(donor, cache), "organ (in situ, cached prefix)"
                counts = {k: cache.stats()[k] for k in ("hits", "misses", "uncached")}
            # What the organ trains on, recorded as its routing signature (not_hub.signature): the hidden states
            # entering its first layer, cached prefix or not.
            collector = SignatureCollector(transplant.layers[0])
            try:
                metrics = fit_parameters(model, params, data, args, label)
            finally:
                signature = collector.finish()
                if model is not donor:
                    stats = cache.stats()  # lookups: this run's only (a shared cache counts every run's)
                    stats |= {k: stats[k] - v for k, v in counts.items()}
                    cache_info = {"layers": [0, start], **stats, **({"reused": True} if prefix_cache else {})}
                    if prefix_cache is None:
                        cache.close()  # its temporary file goes now, not at garbage collection
            organ.load_state_dict(transplant.to_organ().state_dict())
        if signature is not None:
            organ.set_routing_signature(signature)
    organ.eval()
    organ.config.training = {"method": method, "data": data.description, **metrics.to_dict()}
    if method == "in_situ":
        organ.config.training["prefix_cache"] = cache_info
    return metrics


def _halves(args: OrganTrainingArguments) -> tuple[OrganTrainingArguments, OrganTrainingArguments]:
    """Split a run's length (epochs, steps, seconds) in two; each half checkpoints in its own sub-folder."""
    first, second = OrganTrainingArguments(**asdict(args)), OrganTrainingArguments(**asdict(args))
    for half, name in ((first, "standalone"), (second, "recovery")):
        half.epochs = args.epochs / 2
        half.max_steps = max(1, args.max_steps // 2) if args.max_steps is not None else None
        half.max_tokens = max(1, args.max_tokens // 2) if args.max_tokens is not None else None
        half.max_seconds = args.max_seconds / 2 if args.max_seconds is not None else None
        half.output_dir = str(Path(args.output_dir) / name) if args.output_dir else None
    return first, second


def _train_recovered(organ, donor: nn.Module, data: BlockData, args: OrganTrainingArguments, radius: int):
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
    args: OrganTrainingArguments | None = None,
    **kwargs: Any,
) -> TrainingMetrics:
    """Recovery fine-tuning: train the transplanted organ(s) and `radius` neighbouring layers on each side.

    With several transplants (a list), they are recovered jointly in one run: every organ and every neighbour
    trains together. Everything else in the recipient stays frozen. The neighbours' weights before recovery are
    kept in the transplant that owns them, so `explant()` still restores the recipient bit-exactly, in any order.
    The paper recovers for 3-5 epochs over a small set; here the default is one pass, like every other method.

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
    args = _args(args, kwargs, lr=DEFAULT_LR["recovery"])
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
    collectors = [SignatureCollector(t.layers[0]) for t in transplants]  # each organ's routing signature
    try:
        metrics = fit_parameters(recipient, params, data, args, label)
    finally:
        signatures = [c.finish() for c in collectors]
    for t, signature in zip(transplants, signatures, strict=True):
        if signature is not None:  # carried out of the recipient by `transplant.to_organ()`
            t._routing = {k: v.clone() for k, v in signature.tensors().items()}
            t._organ_config.routing_signature = signature.summary()
    recipient.eval()
    for t in transplants:
        t.entry["recovery"] = {"radius": radius, "joint": len(transplants), **metrics.to_dict(history=False)}
    return metrics


def train_bridges(
    recipient: nn.Module,
    transplant: Transplant,
    data: BlockData,
    *,
    args: OrganTrainingArguments | None = None,
    **kwargs: Any,
) -> TrainingMetrics:
    """Train only the bridges of a `mode="bridge"` transplant (the organ and the recipient stay frozen)."""
    if transplant.mode != "bridge":
        raise InvalidModeError(
            f"this transplant has mode={transplant.mode!r}; bridges exist only with transplant_into(..., mode='bridge')"
        )
    args = _args(args, kwargs, lr=DEFAULT_LR["bridges"])
    torch.manual_seed(args.seed)
    params = [p for bridge in transplant.bridges for p in bridge.parameters()]
    metrics = fit_parameters(recipient, params, data, args, "bridges")
    recipient.eval()
    transplant.entry["bridge_training"] = metrics.to_dict(history=False)
    return metrics


def compute_routing_signature(
    organ, model: nn.Module, documents: list[str], *, tokenizer, block_size: int = 256, batch_size: int = 8
) -> Signature:
    """Give an organ published before signatures existed (or trained standalone) a routing signature
    (`not_hub.signature`) from a few documents of the domain it was meant for: `model` (its base model) runs them
    with the organ at its default transplant, the hidden states entering the organ are collected, and the signature
    is recorded on the organ. Half the documents estimate the statistics, the other half calibrate the threshold.

    Raises:
        InvalidArgumentError: fewer than 2 documents, or too few tokens for a signature.

    Example:
        ```python
        >>> not_hub.compute_routing_signature(organ, base_model, my_domain_docs[:40], tokenizer=tokenizer)
        ```
    """
    if len(documents) < 2:
        raise InvalidArgumentError(
            f"compute_routing_signature needs at least 2 documents of the organ's domain (got {len(documents)}): "
            "half to estimate, half to calibrate"
        )
    half = len(documents) // 2
    with organ.transplanted(model) as transplant, torch.no_grad():
        collector = SignatureCollector(transplant.layers[0])
        mode = transplant.layers[0].training
        try:
            for part, training in ((documents[:half], True), (documents[half:], False)):
                blocks = pack_blocks(part, tokenizer, block_size)["input_ids"]
                transplant.layers[0].train(training)  # the collector sums training-mode inputs, calibrates on eval
                for i in range(0, len(blocks), batch_size):
                    model(input_ids=torch.as_tensor(blocks[i : i + batch_size]), use_cache=False)
        finally:
            transplant.layers[0].train(mode)
        signature = collector.finish()
    if signature is None:
        raise InvalidArgumentError(
            f"{sum(len(d) for d in documents):,} characters of documents gave too few tokens for a signature; pass "
            "more documents of the organ's domain"
        )
    organ.set_routing_signature(signature)
    return signature
