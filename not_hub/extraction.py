"""Cutting an organ (k contiguous decoder layers) out of a donor causal LM."""

from __future__ import annotations

import logging
import operator
from pathlib import Path

import torch
from huggingface_hub import ModelCard, try_to_load_from_cache
from torch import nn

from .architectures import get_layer_stack, parameter_device_dtype, resolve_architecture
from .compatibility import structural_signature
from .configuration_organ import OrganConfig
from .errors import InvalidLayerRangeError
from .loading import KNOWN_LICENSES
from .modeling_organ import OrganModel
from .plan import plan_transplant
from .transplant import Transplant, apply_transplant_plan, occupied_ranges

logger = logging.getLogger(__name__)

DEFAULT_ORGAN_LAYERS = 3


def default_layer_range(num_layers: int, k: int = DEFAULT_ORGAN_LAYERS) -> tuple[int, int]:
    """The paper's default organ: k layers starting at floor(L / 3)."""
    start = num_layers // 3
    return start, start + k


def check_layer_range(layer_range: tuple[int, int], num_layers: int) -> tuple[int, int]:
    """Validate a half-open `(start, stop)` range against a stack of `num_layers` layers."""
    # Exactly two integers (numpy integers too): a float, a bool or a string such as "13" is refused, not coerced.
    try:
        if isinstance(layer_range, (str, bytes)) or len(layer_range) != 2:
            raise TypeError
        if any(isinstance(x, bool) for x in layer_range):
            raise TypeError
        start, stop = (operator.index(x) for x in layer_range)
    except TypeError:
        raise InvalidLayerRangeError(
            f"layer_range={layer_range!r} is not a pair of integers; pass layer_range=(start, stop)"
        ) from None
    if not 0 <= start < stop <= num_layers:
        raise InvalidLayerRangeError(
            f"layer_range=({start}, {stop}) does not fit a {num_layers}-layer model; expected "
            f"0 <= start < stop <= {num_layers} (half-open: layers start .. stop-1)"
        )
    return start, stop


def donor_license(base_model: str | None) -> str | None:
    """The donor's licence from its model card, if one is at hand offline (a local folder or the Hub cache)."""
    if not base_model:
        return None
    card_path = Path(base_model) / "README.md"
    if not card_path.is_file() and base_model.count("/") == 1 and not base_model.startswith((".", "/")):
        cached = try_to_load_from_cache(base_model, "README.md")
        card_path = Path(cached) if isinstance(cached, str) else None
    if card_path is not None and card_path.is_file():
        try:
            license = ModelCard.load(card_path).data.license
        except Exception as err:  # a malformed card (YAML errors, odd metadata) must not stop extraction
            logger.warning("could not read the licence from %s (%s); leaving it unset", card_path, err)
            license = None
        if license:
            return license
    return KNOWN_LICENSES.get(base_model)


@torch.no_grad()
def extract_organ(
    model: nn.Module,
    layer_range: tuple[int, int] | None = None,
    *,
    base_model: str | None = None,
    revision: str | None = None,
    license: str | None = None,
) -> OrganModel:
    """Cut decoder layers `[start, stop)` out of a causal LM as an `OrganModel`.

    The donor is left untouched: the organ is built with the donor family's own layer class and owns copies of
    the weights, in the donor's dtype, on the CPU.

    Args:
        model: the donor, a transformers decoder-only causal LM (`AutoModelForCausalLM`).
        layer_range: half-open `(start, stop)`; default 3 layers from floor(L/3) (the paper's default).
        base_model: the donor's Hub repo id or path recorded in the organ (default: `model.name_or_path`).
        revision: the donor's revision recorded in the organ.
        license: the organ's licence (default: the donor's, read from its model card when one is at hand).

    Returns:
        The organ, in eval mode.

    Raises:
        UnsupportedArchitectureError: the donor is not a decoder-only causal LM.
        InvalidLayerRangeError: the range does not fit the donor.

    Example:
        ```python
        >>> organ = not_hub.extract_organ(model, layer_range=(10, 13))
        >>> organ.config.layer_range
        (10, 13)
        ```
    """
    spec = resolve_architecture(model)
    stack = get_layer_stack(model, spec)
    if layer_range is None:
        if len(stack) < DEFAULT_ORGAN_LAYERS:
            raise InvalidLayerRangeError(
                f"the donor has {len(stack)} layers, fewer than the default organ's {DEFAULT_ORGAN_LAYERS}; "
                "pass layer_range=(start, stop)"
            )
        layer_range = default_layer_range(len(stack))
    start, stop = check_layer_range(layer_range, len(stack))
    donor_config = model.config
    _, dtype = parameter_device_dtype(stack[start])
    config_dict = donor_config.to_dict()
    config_dict.pop("transplants", None)  # an organ is the donor's own layers, whatever was grafted elsewhere
    config_dict.pop("quantization_config", None)  # weights are stored dequantized
    base_model = base_model or getattr(model, "name_or_path", None) or None
    config = OrganConfig(
        base_model=base_model,
        license=license or donor_license(base_model),
        base_model_revision=revision,
        donor_model_type=donor_config.model_type,
        donor_architectures=list(donor_config.architectures or [type(model).__name__]),
        donor_config=config_dict,
        donor_num_hidden_layers=len(stack),
        layer_range=(start, stop),
        architecture=spec.to_dict(),
        signature=structural_signature(donor_config, stack[start]),
    )
    organ = OrganModel(config).to(dtype)
    for i, index in enumerate(range(start, stop)):
        state = {k: v.detach().to("cpu", copy=True) for k, v in stack[index].state_dict().items()}
        organ.layers[i].load_state_dict(state, strict=True)
    return organ.eval()


@torch.no_grad()
def excise(
    model: nn.Module, layer_range: tuple[int, int], *, base_model: str | None = None, revision: str | None = None
) -> tuple[OrganModel, Transplant]:
    """Remove decoder layers `[start, stop)` from `model`, in place (layer pruning, as in ShortGPT or BlockPruner).

    The removed layers come back as an `OrganModel` (save or push it like any organ), and the returned `Transplant`
    puts them back bit for bit with `.explant()`. The pruned model saves as a plain transformers checkpoint
    (`num_hidden_layers` and per-layer config lists follow) that `AutoModelForCausalLM` loads without not_hub.

    Args:
        model: a transformers decoder-only causal LM.
        layer_range: half-open `(start, stop)` of the layers to remove; at least one layer must remain.

    Returns:
        `(organ, transplant)`: the removed layers, and the record whose `explant()` restores the model.

    Raises:
        InvalidLayerRangeError: the range does not fit, or would remove every layer.
        InvalidPositionError: the range cuts into an organ transplanted earlier.

    Example:
        ```python
        >>> organ, excision = not_hub.excise(model, (20, 24))
        >>> model.save_pretrained("pruned")  # 26 layers, plain transformers
        >>> excision.explant()  # the 30-layer model again
        ```
    """
    spec = resolve_architecture(model)
    stack = get_layer_stack(model, spec)
    start, stop = check_layer_range(layer_range, len(stack))
    if stop - start == len(stack):
        raise InvalidLayerRangeError(
            f"layer_range=({start}, {stop}) would remove all {len(stack)} layers; keep at least one"
        )
    organ = extract_organ(model, (start, stop), base_model=base_model, revision=revision)
    plan = plan_transplant("excise", start, organ_layers=0, depth=len(stack), occupied=occupied_ranges(model),
                           remove=stop - start)  # fmt: skip
    return organ, apply_transplant_plan(model, spec, plan, organ, incoming=[])
