"""Organ training on `transformers.Trainer`: the field's own loop, with callbacks for what it lacks.

`fit_parameters` (every not_hub training function, and the benchmarks' LoRA and full fine-tuning baselines) builds a
`transformers.Trainer` over the model, freezes everything but the parameters being trained, and adds:

- `WallClockBudget`: stop once *training* time (validation excluded) reaches `max_seconds`; with a budget, the
  learning-rate schedule (warmup, then linear decay to 0) is laid out over the budget, so it completes within it;
- `_BestValidation`: validation every `eval_every` steps and at the start, the best validation weights kept (and put
  back at the end), the history, and a completion marker written last into each checkpoint, so a checkpoint cut
  short by a kill is never resumed from;
- `OrganTrainer`: checkpoints hold only the trained parameters (safetensors), not the frozen model around them.

Trackers (`report_to`), gradient checkpointing, `accelerate launch` (DDP, FSDP, DeepSpeed through
`trainer_args`) work as for any Trainer, because this *is* the Trainer.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import parse_flag_from_env
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback
from transformers import TrainingArguments as HFTrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from .atomic import describe_os_error
from .errors import CheckpointFormatError, OutputPathError

logger = logging.getLogger(__name__)

TRAINED_FILE = "trained_parameters.safetensors"
BEST_FILE = "best_params.safetensors"
STATE_FILE = "not_hub_state.json"  # written last: a checkpoint without it was cut short and is never resumed


def process_state() -> PartialState:
    """accelerate's view of this process, as the Trainer sets it up.

    `PartialState()` alone ignores `ACCELERATE_USE_CPU`: under `accelerate launch` on CPUs it would tell every process
    that it is the main one, of one, so each would write the run dir and lay out the steps for one process.
    """
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def finished_checkpoints(output_dir: Path) -> list[Path]:
    """The run dir's checkpoints that were completely written, oldest first."""
    found = [
        p
        for p in output_dir.glob("checkpoint-*")
        if p.is_dir() and p.name.split("-", 1)[1].isdigit() and (p / STATE_FILE).is_file()
    ]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


class Clock:
    """Training time of a run: wall-clock since start, minus validation, plus what earlier sessions used."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.validation_s = 0.0
        self.first_step_s: float | None = None

    def resume(self, training_s: float, validation_s: float, first_step_s: float | None) -> None:
        """Carry on from an earlier session's clock (read from a checkpoint)."""
        self.t0 = time.perf_counter() - training_s - validation_s
        self.validation_s, self.first_step_s = validation_s, first_step_s

    @property
    def wall_clock_s(self) -> float:
        return time.perf_counter() - self.t0

    @property
    def training_s(self) -> float:
        return self.wall_clock_s - self.validation_s


class WallClockBudget(TrainerCallback):
    """Stop training once `max_seconds` of training time have passed (checked after every optimizer step).

    Works with any `transformers.Trainer`: `trainer.add_callback(WallClockBudget(120))`.
    """

    def __init__(self, max_seconds: float, clock: Clock | None = None):
        self.max_seconds = max_seconds
        self.clock = clock

    def on_train_begin(self, args, state, control, **kwargs):
        if self.clock is None:
            self.clock = Clock()

    def on_step_end(self, args, state, control, **kwargs):
        if self.clock.training_s >= self.max_seconds:
            control.should_training_stop = True
        return control


class _EpochLimit(TrainerCallback):
    """A stream has no length: Trainer would loop over it forever; stop after `epochs` passes."""

    def __init__(self, epochs: float):
        self.epochs, self.passes = epochs, 0

    def on_epoch_end(self, args, state, control, **kwargs):
        # (Trainer's own `state.epoch` is counted against the run's step budget, which a stream's end cuts short.)
        self.passes += 1
        if self.passes >= math.ceil(self.epochs):
            control.should_training_stop = True
        return control


class _Progress(TrainerCallback):
    """One tqdm bar with the loss (an EMA) and tokens/s, main process only."""

    def __init__(self, label: str, enabled: bool, owner: _BestValidation):
        self.label, self.enabled, self.owner = label, enabled, owner
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.enabled and state.is_local_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.label, unit="step")
        self.t0, self.tokens = time.perf_counter(), state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            rate = (state.num_input_tokens_seen - self.tokens) / max(time.perf_counter() - self.t0, 1e-9)
            self.t0, self.tokens = time.perf_counter(), state.num_input_tokens_seen
            loss = self.owner.train_loss
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}" if loss is not None else "-", tok_s=f"{rate:,.0f}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()


class _BestValidation(TrainerCallback):
    """Validation every `eval_every` steps with the best weights kept; the run's own resumable state."""

    def __init__(
        self,
        params: dict[str, nn.Parameter],
        validate,
        eval_every: int,
        clock: Clock,
        marks: list[float] | None = None,
    ):
        self.params, self.validate_fn, self.eval_every, self.clock = params, validate, eval_every, clock
        self.marks = sorted(marks or [])  # training seconds at which to validate as well (a learning curve)
        self.best: dict[str, torch.Tensor] | None = None
        self.best_loss: float | None = None
        self.best_step: int | None = None
        self.train_loss: float | None = None
        self.history: list[dict[str, Any]] = []
        self.pending_log: dict[str, float] | None = None
        self.lr: float | None = None  # the schedule's rate after the last optimizer step

    # -- state carried across a kill -------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "best_validation_loss": self.best_loss,
            "best_step": self.best_step,
            "train_loss": self.train_loss,
            "history": self.history,
            "training_s": self.clock.training_s,
            "validation_s": self.clock.validation_s,
            "first_step_s": self.clock.first_step_s,
        }

    def restore(self, checkpoint: Path) -> None:
        state = json.loads((checkpoint / STATE_FILE).read_text())
        self.best_loss, self.best_step = state["best_validation_loss"], state["best_step"]
        self.train_loss, self.history = state["train_loss"], state["history"]
        self.clock.resume(state["training_s"], state["validation_s"], state.get("first_step_s"))
        self.marks = [m for m in self.marks if m > state["training_s"]]  # those passed were validated before the kill
        if (checkpoint / BEST_FILE).is_file():
            self.best = load_file(checkpoint / BEST_FILE)

    # -- validation ------------------------------------------------------------------------------------------
    def run_validation(self, step: int, tokens_seen: int | None = None) -> None:
        t0 = time.perf_counter()
        training_s = self.clock.training_s
        loss = self.validate_fn()
        self.clock.validation_s += time.perf_counter() - t0
        self.history.append(
            {
                "step": step,
                "validation_loss": loss,
                "train_loss": self.train_loss,
                "lr": self.lr,
                "training_s": round(training_s, 2),
                "tokens_seen": tokens_seen,
            }
        )
        if self.best_loss is None or loss < self.best_loss:
            self.best_loss, self.best_step = loss, step
            self.best = {n: p.detach().to("cpu", copy=True) for n, p in self.params.items()}
        if step > 0:
            self.pending_log = {"eval_loss": loss}  # logged after the step's own log (OrganTrainer)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            loss = float(logs["loss"])
            self.train_loss = loss if self.train_loss is None else 0.9 * self.train_loss + 0.1 * loss

    def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):
        if self.clock.first_step_s is None:
            self.clock.first_step_s = self.clock.training_s
        if lr_scheduler is not None:
            self.lr = float(lr_scheduler.get_last_lr()[0])
        passed = [m for m in self.marks if m <= self.clock.training_s]
        self.marks = self.marks[len(passed) :]
        if self.validate_fn is not None and (
            passed or state.global_step % self.eval_every == 0 or state.global_step == state.max_steps
        ):
            self.run_validation(state.global_step, int(state.num_input_tokens_seen or 0))
        if state.global_step == state.max_steps and args.save_strategy != "no":
            control.should_save = True  # the finished run is on disk: resuming it returns the same weights
        return control

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        process_state().wait_for_everyone()  # every process wrote its part (its RNG state) first
        if state.is_world_process_zero:
            if self.best is not None:
                save_file(self.best, folder / BEST_FILE)
            tmp = folder / f".{STATE_FILE}.tmp"
            tmp.write_text(json.dumps(self.to_json()))
            os.replace(tmp, folder / STATE_FILE)  # the checkpoint is complete from here on
            for old in Path(args.output_dir).glob("checkpoint-*"):
                if old != folder:
                    shutil.rmtree(old, ignore_errors=True)
        process_state().wait_for_everyone()
        return control


class OrganTrainer(Trainer):
    """A `transformers.Trainer` whose checkpoints hold only the trained parameters, with a budget-aware schedule.

    The model's other weights are frozen and never change, so a checkpoint needs only the trainable ones (kilobytes
    to megabytes instead of the whole model); they are written as safetensors and read back on resume.
    """

    def __init__(
        self,
        *args: Any,
        trained: dict[str, nn.Parameter],
        clock: Clock,
        budget_s: float | None,
        warmup_ratio: float = 0.0,
        **kwargs: Any,
    ):
        self._trained, self._clock, self._budget_s, self._warmup = trained, clock, budget_s, warmup_ratio
        super().__init__(*args, **kwargs)

    def _maybe_log_save_evaluate(self, *args: Any, **kwargs: Any) -> None:
        try:
            super()._maybe_log_save_evaluate(*args, **kwargs)
        except (OSError, SafetensorError, RuntimeError) as err:
            if isinstance(err, RuntimeError) and not isinstance(err, SafetensorError) and not _write_failure(err):
                raise  # (torch.save reports a failed write as a RuntimeError; anything else is not a disk problem)
            # A checkpoint write failed (disk full, read-only, ...): the checkpoint it left is incomplete (no
            # completion marker) and would only be skipped on resume; remove it instead of leaving it behind.
            run_dir = Path(self.args.output_dir)
            finished = set(finished_checkpoints(run_dir))
            for partial in run_dir.glob("checkpoint-*"):
                if partial not in finished:
                    shutil.rmtree(partial, ignore_errors=True)
            raise OutputPathError(
                f"could not write a checkpoint into run dir {str(run_dir)!r}: {describe_os_error(err)}. The "
                "unfinished checkpoint was removed; the last finished one (if any) is kept, so the run resumes from "
                "it once there is room"
            ) from None
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, _BestValidation) and callback.pending_log:
                # Validation runs inside on_step_end; logged here, after the step's loss, so trackers (report_to)
                # see it like a Trainer evaluation and the step's own log is not swallowed.
                logs, callback.pending_log = callback.pending_log, None
                self.log(logs)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batch_samples:
            # A stream ran out before `max_steps` (its length is unknown, so the run was laid out past it): end the
            # epoch now instead of spinning through the empty steps that remain (`_EpochLimit` ends the run).
            self.control.should_epoch_stop = True
        return batch_samples, num_items

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        tensors = {n: p.detach().to("cpu").contiguous() for n, p in self._trained.items()}
        save_file(tensors, os.path.join(output_dir, TRAINED_FILE), metadata={"format": "pt"})

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        tensors = load_file(os.path.join(resume_from_checkpoint, TRAINED_FILE))
        if tensors.keys() != self._trained.keys():
            raise CheckpointFormatError(f"{resume_from_checkpoint} holds other parameters than this run trains")
        with torch.no_grad():
            for name, p in self._trained.items():
                p.copy_(tensors[name].to(p.device, p.dtype))

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        if self.lr_scheduler is not None or self._budget_s is None or self.args.lr_scheduler_type != "linear":
            return super().create_scheduler(num_training_steps, optimizer)  # (a schedule asked for by name)
        # A wall-clock budget: progress is the larger of steps done and budget used, so warmup and decay both
        # complete within whichever binds first (a schedule laid out in steps alone would never leave warmup).
        warmup = self._warmup
        clock, budget = self._clock, max(self._budget_s, 1e-9)

        def factor(_: int) -> float:
            progress = max(self.state.global_step / max(num_training_steps, 1), clock.training_s / budget)
            progress = min(progress, 1.0)
            if progress < warmup:
                return progress / warmup
            return max(0.0, (1.0 - progress) / max(1.0 - warmup, 1e-9))

        self.lr_scheduler = LambdaLR(optimizer or self.optimizer, factor)
        self._created_lr_scheduler = True
        return self.lr_scheduler


def collate_blocks(features: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """A `data_collator` for packed blocks (`make_blocks`, `stream_blocks`): every token is a label (the model
    shifts them), and no KV cache is built while training."""
    ids = torch.stack([torch.as_tensor(f["input_ids"]) for f in features])
    return {"input_ids": ids, "labels": ids, "use_cache": False}


_HF_FIELDS = HFTrainingArguments.__dataclass_fields__


def build_trainer_arguments(args, *, output_dir: str, max_steps: int, eval_every: int, save: bool, mixed: str):
    """The `transformers.TrainingArguments` of a not_hub run (its own fields, then `args.trainer_args` on top)."""
    fields = dict(
        output_dir=output_dir,
        max_steps=max_steps,
        learning_rate=args.lr,
        warmup_steps=round(args.warmup_ratio * max_steps) if args.max_seconds is None else 0,
        lr_scheduler_type="linear",
        weight_decay=args.weight_decay,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_grad_norm=args.max_grad_norm or 0.0,
        seed=args.seed,
        bf16=mixed == "bf16",
        fp16=mixed == "fp16",
        # transformers refuses bf16 without a GPU unless told the run is on the CPU (CPU autocast then applies)
        use_cpu=mixed != "no" and not torch.cuda.is_available(),
        save_strategy="steps" if save else "no",
        save_steps=args.save_every or eval_every,
        logging_strategy="steps",
        logging_steps=1,
        report_to=args.report_to,
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=True,
        remove_unused_columns=False,
        include_num_input_tokens_seen="all",
        dataloader_drop_last=False,
        save_only_model=False,
    )
    # transformers 5.x renamed gradient checkpointing to activation checkpointing; older 5.x has only the old name.
    name = "activation_checkpointing" if "activation_checkpointing" in _HF_FIELDS else "gradient_checkpointing"
    fields[name] = args.gradient_checkpointing
    if args.gradient_checkpointing:
        fields[f"{name}_kwargs"] = {"use_reentrant": False}  # frozen embeddings: inputs need no grad
    fields.update(args.trainer_args or {})
    return HFTrainingArguments(**fields)


def _write_failure(err: BaseException) -> bool:
    """torch's own report of a failed write (`torch.save` raises RuntimeError, e.g. on a full disk)."""
    return "PytorchStreamWriter" in str(err) or "file write failed" in str(err)


def _check_checkpoint_files(checkpoint: Path) -> None:
    """Read every file of a checkpoint as Trainer will on resume (JSON, safetensors, torch tensors with
    `weights_only=True`: never code), so a damaged one is a named error before training starts, not a raw one inside
    it."""
    from safetensors import safe_open

    for path in sorted(checkpoint.iterdir()):
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    f.get_slice(key)
        elif path.name.startswith("rng_state"):  # numpy's RNG state: Trainer unpickles it; here only its container
            if not zipfile.is_zipfile(path):
                raise ValueError(f"{path.name} is not a torch checkpoint file")
        elif path.suffix in (".pt", ".pth", ".bin"):
            torch.load(path, map_location="cpu", weights_only=True)


def run_trainer(
    model: nn.Module,
    params: list[nn.Parameter],
    data,
    args,
    *,
    label: str,
    mixed: str,
    output_dir: Path | None,
    max_steps: int,
    eval_every: int,
    validate,
) -> dict[str, Any]:
    """Train `params` of `model` on `data.train` with an `OrganTrainer`; return the run's raw state."""
    names = {id(p): n for n, p in model.named_parameters()}
    trained = {names[id(p)]: p for p in params}
    if AcceleratorState._shared_state and AcceleratorState._shared_state.get("_mixed_precision", mixed) != mixed:
        # accelerate keeps one process-wide state: a bf16 run followed by an fp32 one would be refused.
        AcceleratorState._reset_state(reset_partial_state=False)
    clock = Clock()
    best = _BestValidation(trained, validate, eval_every, clock, args.eval_at_seconds)
    checkpoint = None
    if output_dir is not None and args.resume:
        finished = finished_checkpoints(output_dir)
        checkpoint = finished[-1] if finished else None
        if checkpoint is not None:
            try:
                _check_checkpoint_files(checkpoint)  # every file Trainer will read on resume, before anything runs
                best.restore(checkpoint)
            except Exception as err:  # json, safetensors and torch each raise their own type for a damaged file
                raise CheckpointFormatError(
                    f"the checkpoint {checkpoint} in run dir {output_dir} cannot be read ({type(err).__name__}: "
                    f"{str(err).splitlines()[0][:200] if str(err) else ''}); delete it to resume from an earlier "
                    "one, or start over with resume=False (--no-resume) or another run dir"
                ) from None
            logger.warning("resuming %s from %s", label, checkpoint)
    scratch = None
    if output_dir is None:
        scratch = tempfile.TemporaryDirectory(prefix="not_hub-run-")
    hf_args = build_trainer_arguments(
        args,
        output_dir=str(output_dir) if output_dir is not None else scratch.name,
        max_steps=max_steps,
        eval_every=eval_every,
        save=output_dir is not None,
        mixed=mixed,
    )
    trainer = OrganTrainer(
        model=model,
        args=hf_args,
        train_dataset=data.train,
        data_collator=collate_blocks,
        trained=trained,
        clock=clock,
        budget_s=args.max_seconds,
        warmup_ratio=args.warmup_ratio,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(best)
    if args.max_seconds is not None:
        trainer.add_callback(WallClockBudget(args.max_seconds, clock))
    if not hasattr(data.train, "__len__"):
        trainer.add_callback(_EpochLimit(args.epochs))
    trainer.add_callback(_Progress(label, args.progress, best))
    try:
        if checkpoint is None and validate is not None:
            best.run_validation(0, 0)  # the starting point counts: training must beat it to be kept
        saved = json.loads((checkpoint / "trainer_state.json").read_text()) if checkpoint is not None else {}
        steps_done = int(saved.get("global_step", 0))
        over = args.max_seconds is not None and clock.training_s >= args.max_seconds
        if steps_done < max_steps and not over:
            trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
        elif checkpoint is not None:  # a finished run asked again: its weights, not the starting ones
            trainer._load_from_checkpoint(str(checkpoint))
        step = trainer.state.global_step if trainer.state.global_step else steps_done
        tokens = int(trainer.state.num_input_tokens_seen or saved.get("num_input_tokens_seen", 0))
        if validate is not None and (not best.history or best.history[-1]["step"] != step):
            best.run_validation(
                step, tokens
            )  # stopped between validations (time budget): the last weights compete too
        if best.best is not None:  # keep the best validation weights
            with torch.no_grad():
                for name, p in trained.items():
                    p.copy_(best.best[name].to(p.device, p.dtype))
        num_processes = trainer.accelerator.num_processes
    finally:
        trainer.accelerator.free_memory()
        if scratch is not None:
            scratch.cleanup()
    return {
        "step": step,
        "tokens_seen": tokens,
        "train_loss": best.train_loss,
        "best_validation_loss": best.best_loss,
        "best_step": best.best_step,
        "history": best.history,
        "wall_clock_s": clock.wall_clock_s,
        "validation_s": clock.validation_s,
        "first_step_s": clock.first_step_s,
        "num_processes": num_processes,
    }
