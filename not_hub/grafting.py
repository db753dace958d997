"""Organs in the field's trainers: a grafted model whose only trainable weights are the organ's, as peft does.

`get_organ_model(organ, model)` grafts the organ at its slot (its default transplant) and freezes everything else,
returning the same ordinary `PreTrainedModel`: `transformers.Trainer`, TRL's trainers and `accelerate launch`
(DDP, FSDP, DeepSpeed) train it like a peft model from `get_peft_model`. `unload_organ(model)` takes the trained
organ out as an `OrganModel` and gives the model back exactly as it was (weights, config, `requires_grad`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .errors import TransplantStateError
from .transplant import Transplant, transplants_of

# The grafting state lives on the model itself (a plain attribute, not a weak map keyed by the model), so that
# `copy.deepcopy(model)` carries it, with the copied parameters in it, and unloading works on the copy too.
_STATE_ATTR = "_not_hub_grafting"


@dataclass(eq=False)
class _GraftingState:
    """What `get_organ_model` changed on one model, to put back when its last organ is unloaded."""

    # Every parameter the model held before its first graft (and any it gained since), with its requires_grad then.
    flags: list[tuple[nn.Parameter, bool]]
    use_cache: bool | None
    # Whether `forward` was an instance attribute then (accelerate's autocast wrapper is one, set by `prepare`).
    had_forward: bool
    transplants: list[Transplant] = field(default_factory=list)


def _state(model: nn.Module) -> _GraftingState | None:
    state = model.__dict__.get(_STATE_ATTR)
    if state is None:
        return None
    current = {id(t) for t in transplants_of(model)}
    state.transplants = [t for t in state.transplants if t.active and id(t) in current]
    return state


def _freeze_all_but_organs(model: nn.Module, state: _GraftingState) -> None:
    """Every organ grafted by `get_organ_model` trainable, every other parameter frozen."""
    trainable = {id(p) for t in state.transplants for layer in t.layers for p in layer.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)


def get_organ_model(organ, model: nn.Module, *, position: int | None = None, mode: str | None = None, **kwargs: Any):
    """Graft `organ` into `model` and leave only the organ's weights trainable (peft's `get_peft_model`, for organs).

    Calling it again grafts a second organ: every organ grafted this way stays trainable, the rest frozen.

    Args:
        organ: an `OrganModel` (e.g. `extract_organ(model)` or `OrganModel.from_pretrained(repo_id)`).
        model: any compatible `AutoModelForCausalLM` model; changed in place and returned.
        position / mode / kwargs: where and how to graft (default: the organ's default transplant, a replace at
            the slot it was cut from); see `OrganModel.transplant_into`.

    Returns:
        `model` itself: an ordinary `PreTrainedModel` with the organ grafted, every other parameter frozen
        (`requires_grad=False`), ready for `transformers.Trainer(model=model, ...)`.

    Raises:
        IncompatibleOrganError, InvalidPositionError, InvalidModeError: as `transplant_into`, with `model` unchanged.

    Example:
        ```python
        >>> model = not_hub.get_organ_model(organ, model)
        >>> transformers.Trainer(model=model, args=TrainingArguments("out"), train_dataset=blocks).train()
        >>> trained = not_hub.unload_organ(model)   # the organ out, the model as it was
        ```
    """
    state = _state(model)
    if state is None or not state.transplants:
        flags = [(p, p.requires_grad) for p in model.parameters()]
        state = _GraftingState(flags, getattr(model.config, "use_cache", None), "forward" in model.__dict__)
    else:  # parameters the model gained since the first graft (not an organ of ours) keep their flags too
        known = {id(p) for p, _ in state.flags} | {
            id(p) for t in state.transplants for layer in t.layers for p in layer.parameters()
        }
        state.flags += [(p, p.requires_grad) for p in model.parameters() if id(p) not in known]
    transplant = organ.transplant_into(model, position=position, mode=mode, **kwargs)  # (nothing changed if it fails)
    state.transplants.append(transplant)
    model.__dict__[_STATE_ATTR] = state
    _freeze_all_but_organs(model, state)
    return model


def unload_organ(model: nn.Module, transplant: Transplant | None = None):
    """Take an organ grafted by `get_organ_model` out of `model`, trained; restore `model` as it was.

    Organs may be unloaded in any order. While others remain, they stay trainable and the layers that come back are
    frozen; when the last one goes, every parameter gets back the `requires_grad` it had before the first graft,
    `config.use_cache` its value, and `forward` loses the autocast wrapper accelerate's mixed precision put on it.

    Args:
        model: the model `get_organ_model` returned (after training), or a `copy.deepcopy` of it.
        transplant: which graft, when several were made (default: the newest).

    Returns:
        The trained `OrganModel` (its config records where it sat; `save_pretrained` / `push_to_hub` it).

    Raises:
        TransplantStateError: `model` holds no live organ grafted by `get_organ_model`, or not `transplant`.
    """
    state = _state(model)
    live = state.transplants if state is not None else []
    if transplant is not None:
        live = [t for t in live if t is transplant]
    if not live:
        which = "that organ" if transplant is not None and state is not None and state.transplants else "no organ"
        raise TransplantStateError(
            f"this model holds {which} grafted by not_hub.get_organ_model (or it was already unloaded); call "
            "get_organ_model(organ, model) first"
        )
    chosen = live[-1]
    organ = chosen.to_organ()
    chosen.explant()
    state.transplants.remove(chosen)
    if state.transplants:
        _freeze_all_but_organs(model, state)
        return organ
    for p, flag in state.flags:
        p.requires_grad_(flag)
    if state.use_cache is not None:
        model.config.use_cache = state.use_cache
    if not state.had_forward:  # accelerate's autocast wrapper (`Accelerator.prepare` with bf16/fp16): the class's own
        model.__dict__.pop("forward", None)
        model.__dict__.pop("_original_forward", None)
    del model.__dict__[_STATE_ATTR]
    return organ


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, as peft's `get_nb_trainable_parameters`."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
