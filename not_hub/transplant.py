"""Grafting an organ into a recipient (transplant) and taking it out again (explant).

Both operations are all-or-nothing: every check (architecture, compatibility, bounds, overlap) runs before the
recipient is touched, and if anything fails while the layer stack is being rewired, the stack and config are put
back as they were before the error propagates.

Index arithmetic, with k = organ size and L = recipient depth before the transplant:

- `mode="replace"`: the organ occupies recipient layers [position, position + k); 0 <= position <= L - k.
- `mode="insert"`: the organ is placed before recipient layer `position` (after layer position - 1), so it
  occupies [position, position + k) of the new, L + k deep stack; 0 <= position <= L.
- `mode="bridge"`: as insert, with a trainable linear bridge before the organ's first layer and after its last
  (identity-initialised, or the organ's own trained bridges), held in `BridgedLayer` wrappers.
"""

from __future__ import annotations

import copy
import logging
import operator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .architectures import (
    ArchitectureSpec,
    build_shell,
    get_layer_stack,
    parameter_device_dtype,
    point_layer_config,
    renumber_layer_idx,
    resolve_architecture,
)
from .bridges import BridgedLayer, identity_bridge, unwrap
from .compatibility import CompatibilityReport, compare
from .errors import IncompatibleOrganError, InvalidModeError, InvalidPositionError, TransplantStateError

logger = logging.getLogger(__name__)

MODES = ("replace", "insert", "bridge")
# Live transplant records are kept on the recipient under this attribute, oldest first.
_REGISTRY_ATTR = "_not_hub_transplants"


def check_compatibility(organ, recipient: nn.Module) -> CompatibilityReport:
    """Field-by-field comparison of `organ`'s donor signature with `recipient` (see `OrganModel`)."""
    spec = resolve_architecture(recipient)
    stack = get_layer_stack(recipient, spec)
    return compare(organ.config, recipient.config, stack[0])


@dataclass(eq=False)
class Transplant:
    """The record of one transplant; `.explant()` undoes it.

    Attributes:
        recipient: the model the organ was grafted into.
        position: the recipient index of the organ's first layer at transplant time.
        mode: "replace" or "insert".
        layers: the organ's layer modules as they sit in the recipient (copies of the organ's, in the recipient's
            dtype and device). Train or inspect them here; `OrganModel` itself is left untouched.
        record: the entry written to `recipient.config.transplants` (organ id, revision, position, mode, ...).
    """

    recipient: nn.Module
    position: int
    mode: str
    layers: list[nn.Module]
    record: dict[str, Any]
    _spec: ArchitectureSpec
    _organ_config: Any = None
    _replaced: list[nn.Module] = field(default_factory=list)
    _replaced_per_layer: dict[str, list] = field(default_factory=dict)
    # Recipient layers changed by recovery (module -> state before), restored on explant.
    _neighbour_backup: list[tuple[nn.Module, dict]] = field(default_factory=list)
    # (device, dtype) the organ's layers were placed with at transplant time.
    _placed_as: tuple[torch.device, torch.dtype] | None = None
    active: bool = True

    @property
    def bridges(self) -> list[nn.Module]:
        """The trainable bridges of a `mode="bridge"` transplant (empty otherwise): [bridge_in, bridge_out]."""
        if self.mode != "bridge":
            return []
        return [self.layers[0].bridge_in, self.layers[-1].bridge_out]

    def neighbour_layers(self, radius: int) -> list[nn.Module]:
        """Up to `radius` recipient layers on each side of the organ (fewer at the ends of the stack)."""
        stack = get_layer_stack(self.recipient, self._spec)
        indices = self.layer_indices
        lo, hi = max(0, indices[0] - radius), min(len(stack), indices[-1] + 1 + radius)
        return [stack[i] for i in range(lo, indices[0])] + [stack[i] for i in range(indices[-1] + 1, hi)]

    def backup_neighbours(self, layers: list[nn.Module]) -> None:
        """Remember recipient layers' weights before recovery changes them, so `explant()` can restore them."""
        known = {id(m) for m, _ in self._neighbour_backup}
        for layer in layers:
            if id(layer) not in known:
                state = {k: v.detach().clone() for k, v in layer.state_dict().items()}
                self._neighbour_backup.append((layer, state))

    def to_organ(self):
        """An `OrganModel` holding the organ's current weights in the recipient (after training), bridges included.

        Save it to keep what training or recovery changed: `record.to_organ().save_pretrained(dir)`.
        """
        from .modeling_organ import OrganModel

        config = copy.deepcopy(self._organ_config)
        config.bridges = self.mode == "bridge"
        organ = OrganModel(config)
        state = {}
        for i, layer in enumerate(self.layers):
            for key, value in unwrap(layer).state_dict().items():
                state[f"layers.{i}.{key}"] = value.detach().to("cpu", copy=True)
        if config.bridges:
            for name, bridge in zip(("bridge_in", "bridge_out"), self.bridges, strict=True):
                for key, value in bridge.state_dict().items():
                    state[f"{name}.{key}"] = value.detach().to("cpu", copy=True)
        organ.to(next(iter(state.values())).dtype)
        organ.load_state_dict(state, strict=True)
        organ.name_or_path = self.record.get("organ") or ""
        return organ.eval()

    @property
    def layer_indices(self) -> list[int]:
        """Where the organ's layers sit in the recipient now (other transplants may have shifted them)."""
        stack = get_layer_stack(self.recipient, self._spec)
        ids = {id(layer) for layer in self.layers}
        return [i for i, layer in enumerate(stack) if id(layer) in ids]

    def explant(self) -> None:
        """Take the organ out and restore the recipient's layers and config exactly as they were.

        Raises:
            TransplantStateError: this transplant was already explanted, or its layers were moved out of the
                recipient by other means.
        """
        if not self.active:
            raise TransplantStateError("this transplant was already explanted; explant() can only be called once")
        indices = self.layer_indices
        k = len(self.layers)
        if len(indices) != k or indices != list(range(indices[0], indices[0] + k)):
            raise TransplantStateError(
                f"the organ's {k} layers are no longer a contiguous block of the recipient (found at {indices}); "
                "they were moved or removed outside not_hub, so the recipient cannot be restored"
            )
        start = indices[0]
        stack = get_layer_stack(self.recipient, self._spec)
        config = self.recipient.config
        # The recipient may have been cast or moved since the transplant (`recipient.to(torch.bfloat16)`): the
        # layers it got back would then be the only ones left in the old dtype/device and its forward would fail.
        # They follow the organ layer that held their slot, which moved with the recipient. (Untouched when
        # nothing changed, so the usual explant stays bit-exact.)
        for i, layer in enumerate(self._replaced):
            now = parameter_device_dtype(unwrap(self.layers[i]))
            if now != self._placed_as:
                layer.to(device=now[0], dtype=now[1])
        with _rollback_on_error(self.recipient, self._spec):
            new_layers = list(stack)
            if self.mode == "replace":
                new_layers[start : start + k] = self._replaced
            else:
                del new_layers[start : start + k]
            for layer, state in self._neighbour_backup:
                layer.load_state_dict(state)
            _set_stack(stack, new_layers)
            for name in self._spec.per_layer_config:
                values = getattr(config, name, None)
                if isinstance(values, list):
                    if self.mode == "replace":
                        values[start : start + k] = self._replaced_per_layer[name]
                    else:
                        del values[start : start + k]
            config.num_hidden_layers = len(stack)
            renumber_layer_idx(stack)
            transplants = [r for r in getattr(config, "transplants", []) if r is not self.record]
            if transplants:
                config.transplants = transplants
            else:
                delattr(config, "transplants")
        registry = getattr(self.recipient, _REGISTRY_ATTR)
        registry.remove(self)
        self.active = False

    def __repr__(self) -> str:
        state = "active" if self.active else "explanted"
        return f"Transplant(mode={self.mode!r}, position={self.position}, layers={len(self.layers)}, {state})"


def _set_stack(stack: nn.ModuleList, layers: list[nn.Module]) -> None:
    """Rewrite a ModuleList's contents in place (the model keeps the same ModuleList object)."""
    for key in list(stack._modules):
        del stack._modules[key]
    for i, layer in enumerate(layers):
        stack._modules[str(i)] = layer


class _rollback_on_error:
    """Snapshot a recipient's layer list and the config fields a transplant touches; restore them on error."""

    def __init__(self, recipient: nn.Module, spec: ArchitectureSpec):
        self.recipient, self.spec = recipient, spec

    def __enter__(self):
        config = self.recipient.config
        self.layers = list(get_layer_stack(self.recipient, self.spec))
        self.config_state = {
            name: copy.copy(getattr(config, name))
            for name in ("num_hidden_layers", "transplants", *self.spec.per_layer_config)
            if hasattr(config, name)
        }
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            return False
        config = self.recipient.config
        stack = get_layer_stack(self.recipient, self.spec)
        _set_stack(stack, self.layers)
        for name in ("transplants", *self.spec.per_layer_config):
            if hasattr(config, name) and name not in self.config_state:
                delattr(config, name)
        for name, value in self.config_state.items():
            setattr(config, name, value)
        renumber_layer_idx(stack)
        return False


def _check_position(position, mode: str, k: int, depth: int) -> int:
    """Validate a position (any integer type, e.g. numpy's; not a bool or a float) and return it as an int."""
    if isinstance(position, bool):
        raise InvalidPositionError(f"position={position!r} is a bool; pass the 0-based index of a layer")
    try:
        position = operator.index(position)  # ints and numpy integers; refuses floats and strings
    except TypeError:
        raise InvalidPositionError(
            f"position={position!r} is not an integer; pass the 0-based index of a layer"
        ) from None
    last = depth - k if mode == "replace" else depth
    if not 0 <= position <= last:
        what = "fit into" if mode == "replace" else "be inserted into"
        raise InvalidPositionError(
            f"position={position} with a {k}-layer organ cannot {what} a {depth}-layer recipient in "
            f"mode={mode!r}; expected 0 <= position <= {last}"
        )
    return position


def _check_overlap(recipient: nn.Module, position: int, mode: str, k: int) -> None:
    for other in getattr(recipient, _REGISTRY_ATTR, []):
        indices = other.layer_indices
        lo, hi = indices[0], indices[-1] + 1  # the other organ occupies [lo, hi)
        if mode == "replace":
            clash = position < hi and lo < position + k
        else:  # inserting strictly inside another organ would split it
            clash = lo < position < hi
        if clash:
            raise InvalidPositionError(
                f"position={position} (mode={mode!r}, {k} layers) overlaps the organ already transplanted at "
                f"layers [{lo}, {hi}); choose a position outside that range, or explant it first"
            )


@torch.no_grad()
def transplant_into(organ, recipient: nn.Module, *, position: int | None = None, mode: str = "replace") -> Transplant:
    """Graft `organ` into `recipient`, in place.

    After the transplant the organ's layers (copies, cast to the recipient's dtype and placed on the device of
    the layers they join) sit at `[position, position + k)`; every layer's `layer_idx` is renumbered so the KV
    cache works; `num_hidden_layers` and per-layer config lists (`layer_types`) follow; and
    `recipient.config.transplants` records the organ id, revision, position and mode, so
    `recipient.save_pretrained()` gives a checkpoint that plain transformers loads with identical logits.

    Args:
        organ: the `OrganModel` to graft.
        recipient: a transformers decoder-only causal LM.
        position: 0-based index of the first recipient layer the organ occupies (default: the organ's
            `layer_range` start, i.e. where it came from in the donor).
        mode: "replace" swaps layers [position, position + k); "insert" adds the organ before `position`;
            "bridge" inserts it between trainable identity-initialised linear bridges (`record.bridges`). A
            bridge-mode recipient is not a plain transformers checkpoint: save the organ and its trained bridges
            with `record.to_organ().save_pretrained(dir)` and transplant that again with `mode="bridge"`.

    Returns:
        A `Transplant` record; call `.explant()` to restore the recipient bit-exactly.

    Raises:
        UnsupportedArchitectureError: the recipient is not a decoder-only causal LM.
        IncompatibleOrganError: a structural field differs (the message names it; `.report` has all).
        InvalidPositionError: `position` is out of range or overlaps an organ already transplanted.
        InvalidModeError: `mode` is not "replace", "insert" or "bridge".

    Example:
        ```python
        >>> record = organ.transplant_into(recipient, position=4, mode="insert")
        >>> recipient.config.num_hidden_layers  # 30 + 3
        33
        >>> record.explant()
        ```
    """
    if mode not in MODES:
        raise InvalidModeError(f"mode={mode!r} is not supported; expected one of {MODES}")
    spec = resolve_architecture(recipient)
    stack = get_layer_stack(recipient, spec)
    report = compare(organ.config, recipient.config, stack[0])
    if not report.compatible:
        fields = ", ".join(
            f"{row.field} (organ {row.donor!r:.60}, recipient {row.recipient!r:.60})" for row in report.blocking
        )
        raise IncompatibleOrganError(
            f"organ {organ.name_or_path or '(unsaved)'} cannot be grafted into this "
            f"{recipient.config.model_type} recipient: {fields} differ. Use an organ cut from a model of the same "
            "architecture and size (see organ.check_compatibility(recipient))",
            report,
        )
    k = len(organ.layers)
    depth = len(stack)
    if position is None:
        position = organ.config.layer_range[0]
    position = _check_position(position, mode, k, depth)
    _check_overlap(recipient, position, mode, k)

    # The organ joins the layers around it: same dtype, same device (a device_map'd recipient keeps working).
    neighbour = stack[min(position, depth - 1)] if mode == "replace" else stack[max(position - 1, 0)]
    device, dtype = parameter_device_dtype(neighbour)
    new_layers = [copy.deepcopy(layer).to(device=device, dtype=dtype) for layer in organ.layers]
    if mode == "bridge":
        new_layers = _wrap_with_bridges(organ, new_layers, device, dtype)
    config = recipient.config
    hook = getattr(neighbour, "_hf_hook", None)
    record = {
        "organ": organ.name_or_path or None,
        "organ_revision": getattr(organ, "organ_revision", None),
        "base_model": organ.config.base_model,
        "base_model_revision": organ.config.base_model_revision,
        "donor_layer_range": list(organ.config.layer_range),
        "position": position,
        "mode": mode,
        "num_layers": k,
    }
    donor_per_layer = {name: organ.config.donor_config.get(name) for name in spec.per_layer_config}
    start, stop = organ.config.layer_range

    with _rollback_on_error(recipient, spec):
        for layer in new_layers:
            point_layer_config(layer, config)
            layer.train(recipient.training)
            if hook is not None:
                _attach_device_hook(layer, device)
        layers = list(stack)
        replaced: list[nn.Module] = []
        replaced_per_layer: dict[str, list] = {}
        if mode == "replace":
            replaced = layers[position : position + k]
            layers[position : position + k] = new_layers
        else:
            layers[position:position] = new_layers
        _set_stack(stack, layers)
        for name in spec.per_layer_config:
            values = getattr(config, name, None)
            if not isinstance(values, list):
                continue
            # The organ keeps its donor layers' kinds (e.g. sliding vs full attention), which were fixed when its
            # layers were built; the recipient's list must say so for masks and the KV cache.
            organ_values = donor_per_layer[name][start:stop] if donor_per_layer[name] else values[position:][:k]
            if mode == "replace":
                replaced_per_layer[name] = values[position : position + k]
                values[position : position + k] = organ_values
            else:
                values[position:position] = organ_values
        config.num_hidden_layers = len(stack)
        renumber_layer_idx(stack)
        config.transplants = [*getattr(config, "transplants", []), record]

    transplant = Transplant(
        recipient=recipient,
        position=position,
        mode=mode,
        layers=new_layers,
        record=record,
        _spec=spec,
        _organ_config=copy.deepcopy(organ.config),
        _replaced=replaced,
        _replaced_per_layer=replaced_per_layer,
        _placed_as=(device, dtype),
    )
    if not hasattr(recipient, _REGISTRY_ATTR):
        object.__setattr__(recipient, _REGISTRY_ATTR, [])
    getattr(recipient, _REGISTRY_ATTR).append(transplant)
    logger.info("transplanted %d layers at position %d (%s) -> %d layers", k, position, mode, len(stack))
    return transplant


@contextmanager
def transplanted(organ, recipient: nn.Module, *, position: int | None = None, mode: str = "replace"):
    """Transplant for the duration of a `with` block; the organ is explanted on exit, whatever happens inside.

    Example:
        ```python
        >>> with not_hub.transplanted(organ, recipient, position=4, mode="insert") as t:
        ...     print(recipient.config.num_hidden_layers, t.layer_indices)
        ```
    """
    transplant = transplant_into(organ, recipient, position=position, mode=mode)
    try:
        yield transplant
    finally:
        if transplant.active:
            transplant.explant()


def _wrap_with_bridges(organ, layers: list[nn.Module], device, dtype) -> list[nn.Module]:
    """Put `bridge_in` before the first organ layer and `bridge_out` after the last (one wrapper if k == 1)."""
    hidden = organ.config.signature["hidden_size"]
    if organ.config.bridges:
        bridge_in, bridge_out = copy.deepcopy(organ.bridge_in), copy.deepcopy(organ.bridge_out)
    else:
        bridge_in, bridge_out = identity_bridge(hidden), identity_bridge(hidden)
    bridge_in, bridge_out = bridge_in.to(device=device, dtype=dtype), bridge_out.to(device=device, dtype=dtype)
    if len(layers) == 1:
        return [BridgedLayer(layers[0], bridge_in, bridge_out)]
    return [
        BridgedLayer(layers[0], bridge_in=bridge_in),
        *layers[1:-1],
        BridgedLayer(layers[-1], bridge_out=bridge_out),
    ]


def standalone_shell(organ, donor: nn.Module):
    """The NOT standalone wrapper: `donor`'s frozen embeddings -> the organ's layers -> its final norm and LM head.

    Shares the donor's modules (no second copy of its weights) and runs the organ's own layer objects, so training
    the shell trains the organ.
    """
    start, stop = organ.config.layer_range
    per_layer = {
        name: (organ.config.donor_config.get(name) or [None] * stop)[start:stop]
        for name in resolve_architecture(donor).per_layer_config
        if organ.config.donor_config.get(name)
    }
    shell = build_shell(donor, list(organ.layers), per_layer)
    for layer in organ.layers:
        point_layer_config(layer, shell.config)
    return shell


def transplants_of(recipient: nn.Module) -> list[Transplant]:
    """The live `Transplant` records of a recipient, oldest first."""
    return list(getattr(recipient, _REGISTRY_ATTR, []))


def _attach_device_hook(layer: nn.Module, device: torch.device) -> None:
    """Give an organ layer the accelerate hook its neighbours have, so inputs follow it to its device."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    add_hook_to_module(layer, AlignDevicesHook(execution_device=device, io_same_device=False))


def capture_layer_inputs(model: nn.Module, layer_range: tuple[int, int], *model_args: Any, **model_kwargs: Any):
    """Run `model` once and record what its decoder layers `[start, stop)` receive.

    Returns `(hidden_states, layer_inputs)`: the hidden state entering layer `start` (B, T, C), and for each layer
    of the range the `(args, kwargs)` the family passed besides the hidden state (attention mask, position
    embeddings, ...). Layers of one model may get different inputs (Gemma's sliding and full attention layers get
    different masks), hence one entry per layer. Run an organ on them with `organ(h, layer_inputs=layer_inputs)`.
    The model runs without a KV cache.
    """
    start, stop = layer_range
    stack = get_layer_stack(model)
    captured: dict[int, tuple] = {}
    # Without a cache: a cache object captured here would already hold this pass's keys and values.
    model_kwargs.setdefault("use_cache", False)

    def make_hook(index: int):
        def hook(module, args, kwargs):
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            captured[index] = (hidden, (tuple(args[1:]), kwargs))

        return hook

    handles = [stack[i].register_forward_pre_hook(make_hook(i), with_kwargs=True) for i in range(start, stop)]
    try:
        with torch.no_grad():
            model(*model_args, **model_kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return captured[start][0], [captured[i][1] for i in range(start, stop)]
