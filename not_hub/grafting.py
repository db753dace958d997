"""Organs in the field's trainers: a grafted model whose only trainable weights are the organ's, as peft does.

`get_organ_model(organ, model)` grafts the organ at its slot (its default transplant) and freezes everything else,
returning the same ordinary `PreTrainedModel`: `transformers.Trainer`, TRL's trainers and `accelerate launch`
(DDP, FSDP, DeepSpeed) train it like a peft model from `get_peft_model`. `unload_organ(model)` takes the trained
organ out as an `OrganModel` and gives the model back exactly as it was (weights, config, `requires_grad`).
"""

from __future__ import annotations

import weakref
from typing import Any

from torch import nn

from .errors import TransplantStateError
from .transplant import Transplant, transplants_of

# model -> [(transplant, requires_grad flags of the model's parameters before grafting, config.use_cache)], newest last
_GRAFTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def get_organ_model(organ, model: nn.Module, *, position: int | None = None, mode: str | None = None, **kwargs: Any):
    """Graft `organ` into `model` and leave only the organ's weights trainable (peft's `get_peft_model`, for organs).

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
    flags = [(p, p.requires_grad) for p in model.parameters()]
    transplant = organ.transplant_into(model, position=position, mode=mode, **kwargs)
    trainable = {id(p) for layer in transplant.layers for p in layer.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    # Trainer switches the KV cache off for training (`config.use_cache = False`); unloading switches it back.
    _GRAFTED.setdefault(model, []).append((transplant, flags, getattr(model.config, "use_cache", None)))
    return model


def unload_organ(model: nn.Module, transplant: Transplant | None = None):
    """Take the organ grafted by `get_organ_model` out of `model`, trained; restore `model` as it was.

    Args:
        model: the model `get_organ_model` returned (after training).
        transplant: which graft, when several were made (default: the newest).

    Returns:
        The trained `OrganModel` (its config records where it sat; `save_pretrained` / `push_to_hub` it).

    Raises:
        TransplantStateError: `model` holds no live organ grafted by `get_organ_model`.
    """
    entries = _GRAFTED.get(model, [])
    current = {id(t) for t in transplants_of(model)}
    live = [entry for entry in entries if entry[0].active and id(entry[0]) in current]
    if transplant is not None:
        live = [entry for entry in live if entry[0] is transplant]
    if not live:
        raise TransplantStateError(
            "this model holds no organ grafted by not_hub.get_organ_model (or it was already unloaded); call "
            "get_organ_model(organ, model) first"
        )
    chosen, flags, use_cache = live[-1]
    organ = chosen.to_organ()
    chosen.explant()
    for p, flag in flags:
        p.requires_grad_(flag)
    if use_cache is not None:
        model.config.use_cache = use_cache
    entries[:] = [e for e in entries if e[0] is not chosen]
    return organ


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, as peft's `get_nb_trainable_parameters`."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
