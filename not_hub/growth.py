"""Growth organs: new layers that start as the identity, so grafting them changes nothing until they are trained.

LLaMA-Pro (arXiv 2401.02415) grows a model by inserting copies of its own layers whose output projections are
zeroed: a pre-norm residual layer computes `x + attn(norm(x)) + mlp(norm(x))`, and with the projections that write
into the residual stream set to zero (weights and biases) both branches add exactly 0, so the grown model computes
bit for bit what the original did. Training only the new layers then adds depth without touching what the model
knows. Which modules write into the residual stream is architecture data (`output_projections` in
`architectures/data/*.json`); a family or config where zeroing them is not an identity (a post-norm layer, where a
norm is applied after the residual sum) is refused.
"""

from __future__ import annotations

import torch
from torch import nn

from .architectures import get_layer_stack, resolve_architecture
from .errors import InvalidArgumentError, UnsupportedArchitectureError
from .extraction import extract_organ


def grow_organ(model: nn.Module, position: int, *, num_layers: int = 1, source: int | None = None, **kwargs):
    """A new organ of `num_layers` identity layers, to be inserted before `position` of `model`.

    The layers are copies of `model`'s layers `[source, source + num_layers)` (default: the ones just below
    `position`, as LLaMA-Pro does) with every output projection zeroed. The organ's default transplant is an insert
    at `position`, so `organ.transplant_into(model)` grows the model by `num_layers` layers and leaves its logits
    bit-identical (KV-cached generation included) until the organ is trained (`train_organ(..., method="in_situ")`
    trains it at that slot).

    Args:
        model: the model to grow (left untouched: the organ holds copies).
        position: where the new layers go (0-based index of the first layer of the grown model they occupy).
        num_layers: how many layers the organ adds.
        source: the first of the layers to copy (default `max(position - num_layers, 0)`).
        kwargs: passed to `extract_organ` (e.g. `base_model=`, `revision=`).

    Returns:
        An `OrganModel` with `default_transplant = {"mode": "insert", "position": position}` and `growth` metadata.

    Raises:
        UnsupportedArchitectureError: the family has no output projections in its architecture data, or its config
            makes zeroing them something other than the identity (e.g. OPT with `do_layer_norm_before=False`).
        InvalidArgumentError: `position`, `num_layers` or `source` out of range.
    """
    spec = resolve_architecture(model)
    if not spec.output_projections:
        raise UnsupportedArchitectureError(
            f"model_type={spec.model_type!r} has no output_projections in its architecture data, so no layer of it "
            "can be made an exact identity; growth organs need a family listed in not_hub/architectures/data"
        )
    for key, wanted in (spec.identity_requires or {}).items():
        if getattr(model.config, key, wanted) != wanted:
            raise UnsupportedArchitectureError(
                f"{spec.model_type} with {key}={getattr(model.config, key)!r}: zeroing the output projections is not "
                f"an identity there (a norm acts after the residual sum); growth organs need {key}={wanted!r}"
            )
    depth = len(get_layer_stack(model, spec))
    for name, value, low, high in (("position", position, 0, depth), ("num_layers", num_layers, 1, depth)):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise InvalidArgumentError(f"{name}={value!r} is not allowed; expected an integer in [{low}, {high}]")
    source = max(position - num_layers, 0) if source is None else source
    if isinstance(source, bool) or not isinstance(source, int) or not 0 <= source <= depth - num_layers:
        raise InvalidArgumentError(
            f"source={source!r} is not allowed with num_layers={num_layers} in a {depth}-layer model; expected an "
            f"integer in [0, {depth - num_layers}]"
        )
    organ = extract_organ(model, layer_range=(source, source + num_layers), **kwargs)
    zeroed = []
    with torch.no_grad():
        for i, layer in enumerate(organ.layers):
            for name, param in layer.named_parameters():
                if any(
                    name == p or name.startswith(p + ".") or name.startswith(p + "_") for p in spec.output_projections
                ):
                    param.zero_()
                    zeroed.append(f"layers.{i}.{name}")
    if not zeroed:
        raise UnsupportedArchitectureError(
            f"none of {list(spec.output_projections)} was found in a {spec.model_type} layer; the architecture data "
            "does not match this model's layers"
        )
    organ.config.default_transplant = {"mode": "insert", "position": position}
    organ.config.growth = {"source_layers": [source, source + num_layers], "zeroed": zeroed}
    return organ
