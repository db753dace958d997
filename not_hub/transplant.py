"""Executing transplant plans: grafting an organ into a recipient (transplant) and taking it out (explant).

`plan.py` decides what goes where; `apply_plan` here executes a plan or its inverse on a live model: it splices the
layer stack and the per-layer config lists, sets `num_hidden_layers` and renumbers every layer's `layer_idx`.
Transplant, explant and the rollback on error all go through it. Both directions are all-or-nothing: every check
runs before the recipient is touched, and if anything fails while the stack is being rewired, the stack and config
are put back as they were before the error propagates.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .architectures import (
    ArchitectureSpec,
    get_layer_stack,
    parameter_device_dtype,
    point_layer_config,
    renumber_layer_idx,
    resolve_architecture,
)
from .bridges import BridgedLayer, identity_bridge, unwrap
from .compatibility import CompatibilityReport, compare
from .errors import IncompatibleOrganError, InvalidModeError, SameSlotWarning, TransplantStateError
from .plan import MODE_NAMES, TransplantPlan, get_mode, plan_transplant

logger = logging.getLogger(__name__)

MODES = MODE_NAMES
# Live `Transplant`s are kept on the recipient under this attribute, oldest first.
_REGISTRY_ATTR = "_not_hub_transplants"


def check_compatibility(organ, recipient: nn.Module) -> CompatibilityReport:
    """Field-by-field comparison of `organ`'s donor signature with `recipient` (see `OrganModel`)."""
    spec = resolve_architecture(recipient)
    stack = get_layer_stack(recipient, spec)
    return compare(organ.config, recipient.config, stack[0])


# ---------------------------------------------------------------------------------------------------- apply


def _set_stack(stack: nn.ModuleList, layers: list[nn.Module]) -> None:
    """Rewrite a ModuleList's contents in place (the model keeps the same ModuleList object)."""
    for key in list(stack._modules):
        del stack._modules[key]
    for i, layer in enumerate(layers):
        stack._modules[str(i)] = layer


def apply_plan(
    recipient: nn.Module,
    spec: ArchitectureSpec,
    plan: TransplantPlan,
    incoming: list[nn.Module],
    incoming_per_layer: dict[str, list],
    transplants: list[dict],
) -> tuple[list[nn.Module], dict[str, list]]:
    """Execute `plan` on `recipient`, all or nothing: splice `incoming` layers (and their per-layer config values)
    into the stack and record `transplants` as the config's list of transplants.

    Transplant, explant (the plan's inverse) and excision all come through here; if anything fails, the stack and
    config are restored from the snapshot taken on entry before the error propagates. Returns the layers and
    per-layer values that were taken out, which is exactly what `plan.inverse()` needs to undo it.
    """
    with _rollback_on_error(recipient, spec):
        stack = get_layer_stack(recipient, spec)
        config = recipient.config
        layers, removed = plan.splice(list(stack), incoming)
        _set_stack(stack, layers)
        removed_per_layer = {}
        for name in spec.per_layer_config:
            values = getattr(config, name, None)
            if isinstance(values, list):  # e.g. `layer_types`: masks and the KV cache read it per layer index
                new_values, removed_per_layer[name] = plan.splice(values, incoming_per_layer[name])
                values[:] = new_values
        config.num_hidden_layers = len(stack)
        # The KV cache keys its per-layer entries by `layer_idx`: after a splice every layer has its new index.
        renumber_layer_idx(stack)
        if transplants:
            config.transplants = transplants
        elif hasattr(config, "transplants"):
            delattr(config, "transplants")
    return removed, removed_per_layer


class _rollback_on_error:
    """Snapshot a recipient's layer list and the config fields a splice touches; restore them on error."""

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


# ------------------------------------------------------------------------------------------------ the record


def refuse_bridge_save(*args: Any, **kwargs: Any) -> None:
    raise TransplantStateError(
        "this recipient holds a bridge-mode transplant, which a plain transformers checkpoint cannot represent (the "
        "bridges are not part of the model class, so a reload would silently lose them and the organ's weights). "
        "Save the organ with its bridges instead: transplant.to_organ().save_pretrained(dir), and graft it again "
        "with mode='bridge'; or use mode='replace' / 'insert' for a model that saves as plain transformers"
    )


@dataclass(eq=False)
class Transplant:
    """One live transplant; `.explant()` undoes it.

    Attributes:
        recipient: the model the organ was grafted into.
        plan: what was done: `plan.position`, `plan.mode`, how many layers left (`plan.remove`) and came in.
        layers: the incoming layer modules as they sit in the recipient (copies of the organ's, in the recipient's
            dtype and device). Train or inspect them here; the `OrganModel` itself is left untouched.
        entry: this transplant's entry in `recipient.config.transplants` (organ id, revision, position, mode, ...),
            saved with the recipient.
    """

    recipient: nn.Module
    plan: TransplantPlan
    layers: list[nn.Module]
    entry: dict[str, Any]
    _spec: ArchitectureSpec
    _organ_config: Any = None
    _organ_cls: type | None = None
    _removed: list[nn.Module] = field(default_factory=list)
    _removed_per_layer: dict[str, list] = field(default_factory=dict)
    # Recipient layers changed by recovery (module -> state before), restored on explant.
    _neighbour_backup: list[tuple[nn.Module, dict]] = field(default_factory=list)
    # (device, dtype) the incoming layers were placed with at transplant time.
    _placed_as: tuple[torch.device, torch.dtype] | None = None
    # The organ's routing signature tensors (`not_hub.signature`), carried back out by `to_organ`.
    _routing: dict[str, torch.Tensor] | None = None
    active: bool = True

    @property
    def position(self) -> int:
        """The recipient index of the organ's first layer at transplant time."""
        return self.plan.position

    @property
    def mode(self) -> str:
        return self.plan.mode

    @property
    def bridges(self) -> list[nn.Module]:
        """The trainable bridges of a `mode="bridge"` transplant (empty otherwise): [bridge_in, bridge_out]."""
        if not get_mode(self.mode).bridges:
            return []
        return [self.layers[0].bridge_in, self.layers[-1].bridge_out]

    @property
    def layer_indices(self) -> list[int]:
        """Where the organ's layers sit in the recipient now (other transplants may have shifted them)."""
        stack = get_layer_stack(self.recipient, self._spec)
        ids = {id(layer) for layer in self.layers}
        return [i for i, layer in enumerate(stack) if id(layer) in ids]

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

    def to_organ(self, *, neighbours: bool | None = None):
        """An `OrganModel` holding what training and recovery changed: the organ's current weights (bridges
        included) and, after recovery, the recovered neighbouring layers.

        With neighbours, the organ is one contiguous block `[left neighbours, organ, right neighbours]`; its
        `layer_sources` say which layers are the organ's and which are neighbours, and its `default_transplant`
        splices the block in place of those neighbours (and of whatever the organ replaced), so
        `organ.transplant_into(fresh_copy_of_the_recipient)` reproduces the recovered recipient exactly.

        Args:
            neighbours: include the recovered neighbours (default: yes when recovery trained any, except in
                bridge mode, whose bridges sit around the organ's own layers).

        Raises:
            TransplantStateError: neighbours asked for in bridge mode, or they no longer sit next to the organ.
        """
        recovered = [layer for layer, _ in self._neighbour_backup]
        if neighbours is None:
            neighbours = bool(recovered) and not self.bridges
        if neighbours and self.bridges:
            raise TransplantStateError(
                "a bridge-mode organ is exported with its bridges only (they wrap the organ's own first and last "
                "layers); pass neighbours=False, or recover a replace/insert transplant to carry the neighbours"
            )
        config = copy.deepcopy(self._organ_config)
        config.bridges = bool(self.bridges)
        layers, sources = list(self.layers), None
        if neighbours and recovered:
            stack = get_layer_stack(self.recipient, self._spec)
            where = {id(layer): i for i, layer in enumerate(stack)}
            lo, hi = self.layer_indices[0], self.layer_indices[-1] + 1
            found = sorted(where[id(layer)] for layer in recovered if id(layer) in where)
            left, right = [i for i in found if i < lo], [i for i in found if i >= hi]
            if left != list(range(lo - len(left), lo)) or right != list(range(hi, hi + len(right))):
                raise TransplantStateError(
                    f"the recovered neighbours sit at {found}, not next to the organ at [{lo}, {hi}); they cannot be "
                    "exported as one block"
                )
            # Indices in the recipient as it was when this transplant was made: left neighbours end at the plan's
            # position; right neighbours start after the layers the organ replaced.
            p, removed = self.plan.position, self.plan.remove
            own = config.layer_sources or [{"role": "organ", "index": i} for i in config.layer_indices]
            sources = (
                [{"role": "neighbour", "index": p - len(left) + t} for t in range(len(left))]
                + own
                + [{"role": "neighbour", "index": p + removed + t} for t in range(len(right))]
            )
            layers = [stack[i] for i in left] + layers + [stack[i] for i in right]
            config.layer_sources = sources
            config.default_transplant = {
                "mode": "splice",
                "position": p - len(left),
                "remove": len(left) + removed + len(right),
            }
            config.neighbours_from = getattr(self.recipient, "name_or_path", None) or None
        # The signature describes the inputs of the organ's own slot; a block carrying recovered neighbours starts
        # lower, so it has none until one is computed for it.
        keep_signature = bool(config.routing_signature) and self._routing is not None and not sources
        if not keep_signature:
            config.routing_signature = None
        organ = self._organ_cls(config)
        state = {}
        for i, layer in enumerate(layers):
            for key, value in unwrap(layer).state_dict().items():
                state[f"layers.{i}.{key}"] = value.detach().to("cpu", copy=True)
        if config.bridges:
            for name, bridge in zip(("bridge_in", "bridge_out"), self.bridges, strict=True):
                for key, value in bridge.state_dict().items():
                    state[f"{name}.{key}"] = value.detach().to("cpu", copy=True)
        organ.to(next(iter(state.values())).dtype)  # (a layer's dtype: the layers come first)
        if keep_signature:
            state |= {f"routing.{n}": t.clone() for n, t in self._routing.items()}
        organ.load_state_dict(state, strict=True)
        organ.name_or_path = self.entry.get("organ") or ""
        return organ.eval()

    def explant(self) -> None:
        """Take the organ out and restore the recipient's layers and config exactly as they were.

        Executes the transplant's plan in reverse, at wherever the organ's block sits now.

        Raises:
            TransplantStateError: this transplant was already explanted, or its layers were moved out of the
                recipient by other means.
        """
        if not self.active:
            raise TransplantStateError("this transplant was already explanted; explant() can only be called once")
        router = self.recipient.__dict__.get("_not_hub_router")  # (not_hub.routing) its gates go first
        if router is not None:
            router.remove()
        k = len(self.layers)
        if k == 0:  # an excision: nothing of it sits in the stack; it must be the newest surgery still in place
            registry = getattr(self.recipient, _REGISTRY_ATTR)
            if registry[-1] is not self:
                raise TransplantStateError(
                    "layers were transplanted after this excision; explant those first (newest first), then this"
                )
            indices = [self.plan.position]
        else:
            indices = self.layer_indices
        if k and (len(indices) != k or indices != list(range(indices[0], indices[0] + k))):
            raise TransplantStateError(
                f"the organ's {k} layers are no longer a contiguous block of the recipient (found at {indices}); "
                "they were moved or removed outside not_hub, so the recipient cannot be restored"
            )
        depth = len(get_layer_stack(self.recipient, self._spec))
        undo = TransplantPlan(self.mode, indices[0], self.plan.remove, k, depth - k + self.plan.remove).inverse()
        # The recipient may have been cast or moved since the transplant (`recipient.to(torch.bfloat16)`): the
        # layers it gets back would then be the only ones left in the old dtype/device and its forward would fail.
        # They follow the incoming layer that held their slot, which moved with the recipient. (Untouched when
        # nothing changed, so the usual explant stays bit-exact.)
        stack = get_layer_stack(self.recipient, self._spec)
        for i, layer in enumerate(self._removed):
            # (an excision brought no layers in: its removed layers follow the recipient layer at their position)
            reference = self.layers[min(i, k - 1)] if k else stack[min(indices[0], len(stack) - 1)]
            now = parameter_device_dtype(unwrap(reference))
            if now != self._placed_as:
                layer.to(device=now[0], dtype=now[1])
        incoming_per_layer = {name: self._removed_per_layer.get(name, []) for name in self._spec.per_layer_config}
        remaining = [e for e in getattr(self.recipient.config, "transplants", []) if e is not self.entry]
        # The layers that come back follow the model as it is now: train/eval mode, gradient checkpointing, and
        # requires_grad when the rest of the model agrees on it (frozen since the transplant: they come back frozen).
        kept = {id(p) for layer in self.layers for p in layer.parameters()}
        others = {p.requires_grad for p in self.recipient.parameters() if id(p) not in kept}
        for layer in self._removed:
            layer.train(self.recipient.training)
            _follow_checkpointing(layer, stack)
            if len(others) == 1:
                layer.requires_grad_(next(iter(others)))
        apply_plan(self.recipient, self._spec, undo, self._removed, incoming_per_layer, remaining)
        with torch.no_grad():  # recovery's changes to the neighbours go too (same shapes: this cannot fail halfway)
            for layer, state in self._neighbour_backup:
                layer.load_state_dict(state)
        registry = getattr(self.recipient, _REGISTRY_ATTR)
        registry.remove(self)
        if not any(get_mode(t.mode).bridges for t in registry):
            self.recipient.__dict__.pop("save_pretrained", None)
        self.active = False

    def __repr__(self) -> str:
        state = "active" if self.active else "explanted"
        return f"Transplant(mode={self.mode!r}, position={self.position}, layers={len(self.layers)}, {state})"


# ------------------------------------------------------------------------------------------------ transplant


def _defaults(config, mode: str | None, position, remove: int | None) -> tuple[str, Any, int | None]:
    """Mode, position and removed-layer count: as given, else the organ's `default_transplant`, else a replace at
    the organ's donor start."""
    default = config.default_transplant or {}
    uses_default = bool(default) and mode in (None, default.get("mode"))
    mode = default.get("mode", "replace") if mode is None else mode
    if uses_default:
        remove = default.get("remove") if remove is None else remove
        position = default.get("position") if position is None else position
    position = config.layer_range[0] if position is None else position
    return mode, position, remove


def occupied_ranges(recipient: nn.Module) -> list[tuple[int, int]]:
    """Half-open ranges of the recipient held by live transplants (which a new one cannot cut into)."""
    ranges = []
    for other in getattr(recipient, _REGISTRY_ATTR, []):
        indices = other.layer_indices
        if indices:  # an excision holds no layers
            ranges.append((indices[0], indices[-1] + 1))
    return ranges


def _incoming_per_layer(organ, recipient: nn.Module, spec: ArchitectureSpec, plan: TransplantPlan) -> dict[str, list]:
    """Per-layer config values for the incoming layers (e.g. sliding vs full attention in `layer_types`).

    The organ keeps its donor layers' kinds, which were fixed when its layers were built; the recipient's list must
    say so for masks and the KV cache. Without a donor list, the recipient's values around the position are used.
    """
    if plan.insert == 0:  # an excision: nothing comes in
        return {name: [] for name in spec.per_layer_config}
    indices = organ.config.layer_indices
    values = {}
    for name in spec.per_layer_config:
        current = getattr(recipient.config, name, None)
        if not isinstance(current, list):
            values[name] = []
            continue
        donor = organ.config.donor_config.get(name)
        if isinstance(donor, list) and all(0 <= i < len(donor) for i in indices):
            values[name] = [donor[i] for i in indices]
        else:
            near = current[plan.position : plan.position + plan.insert] or current[-1:]
            values[name] = (near + [near[-1]] * plan.insert)[: plan.insert]
    return values


@torch.no_grad()
def transplant_into(
    organ,
    recipient: nn.Module,
    *,
    position: int | None = None,
    mode: str | None = None,
    remove: int | None = None,
) -> Transplant:
    """Graft `organ` into `recipient`, in place (the implementation of `OrganModel.transplant_into`).

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
        mode: one of `not_hub.plan.MODES`: "replace" swaps layers [position, position + k); "insert" adds the
            organ before `position`; "bridge" inserts it between trainable identity-initialised linear bridges
            (`transplant.bridges`); "splice" takes out `remove` recipient layers and puts the organ in their place.
            A bridge-mode recipient cannot be saved as a plain transformers checkpoint (its `save_pretrained`
            raises `TransplantStateError` until explant): save `transplant.to_organ()` instead.
        remove: recipient layers to take out, for mode="splice".

    Returns:
        A `Transplant`; call `.explant()` to restore the recipient bit-exactly.

    Raises:
        UnsupportedArchitectureError: the recipient is not a decoder-only causal LM.
        IncompatibleOrganError: a structural field differs (the message names it; `.report` has all).
        InvalidPositionError: `position` is out of range or overlaps an organ already transplanted.
        InvalidModeError: `mode` is not one of the modes.
    """
    mode, position, remove = _defaults(organ.config, mode, position, remove)
    mode_spec = get_mode(mode)
    if mode == "excise":
        raise InvalidModeError(
            "mode='excise' takes recipient layers out and grafts nothing, so it is not a transplant of an organ; "
            "use not_hub.excise(model, (start, stop))"
        )
    if not mode_spec.bridges and _has_trained_bridges(organ):
        raise InvalidModeError(
            f"organ {organ.name_or_path or '(unsaved)'} carries trained bridges, which mode={mode!r} would leave out "
            "(its layers were trained between them); transplant it with mode='bridge'"
        )
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
    for row in report.warnings:  # e.g. another organ trained for this one's slot is already in the recipient
        warnings.warn(row.warning, SameSlotWarning, stacklevel=3)
    plan = plan_transplant(
        mode,
        position,
        organ_layers=len(organ.layers),
        depth=len(stack),
        occupied=occupied_ranges(recipient),
        remove=remove,
    )
    position, depth = plan.position, len(stack)
    _refuse_offloaded(recipient, stack)
    # The organ joins the layers around it: same dtype, same device (a device_map'd recipient keeps working).
    neighbour = stack[min(position, depth - 1)] if plan.remove else stack[max(position - 1, 0)]
    device, dtype = parameter_device_dtype(neighbour)
    incoming = _copy_layers(organ.layers, device, dtype)
    if mode_spec.bridges:
        incoming = _wrap_with_bridges(organ, incoming, device, dtype)
    return apply_transplant_plan(recipient, spec, plan, organ, incoming)


def _has_trained_bridges(organ) -> bool:
    """The organ holds bridges that are not the identity (an untrained pair changes nothing when left out)."""
    if not getattr(organ.config, "bridges", False):
        return False
    for bridge in (organ.bridge_in, organ.bridge_out):
        eye = torch.eye(bridge.weight.shape[0], dtype=bridge.weight.dtype, device=bridge.weight.device)
        if not torch.equal(bridge.weight, eye) or (bridge.bias is not None and bridge.bias.count_nonzero()):
            return True
    return False


def _follow_checkpointing(layer: nn.Module, stack) -> None:
    """Give a layer joining (or rejoining) the stack the gradient-checkpointing setting of the layers already in it,
    as `model.gradient_checkpointing_enable()` would have given it."""
    current = next((m for m in unwrap(stack[0]).modules() if hasattr(m, "gradient_checkpointing")), None)
    if current is None:
        return
    for module in unwrap(layer).modules():
        if hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = current.gradient_checkpointing
            if hasattr(current, "_gradient_checkpointing_func"):
                module._gradient_checkpointing_func = current._gradient_checkpointing_func


def _copy_layers(layers: nn.ModuleList, device, dtype) -> list[nn.Module]:
    """The organ's layers, copied (the organ stays independent of the recipient), except their config objects: the
    graft points the layers at the recipient's config, so copying the organ's (most of a deepcopy's time) is waste."""
    memo = {id(m.config): m.config for m in layers.modules() if getattr(m, "config", None) is not None}
    return [copy.deepcopy(layer, memo).to(device=device, dtype=dtype) for layer in layers]


def _refuse_offloaded(recipient: nn.Module, stack) -> None:
    """Layers whose weights live on `meta` (offloaded to disk or CPU by accelerate's hooks, or never loaded) cannot
    take part in surgery: an organ placed beside them would be put on `meta` too and its weights lost."""
    offloaded = [
        i
        for i, layer in enumerate(stack)
        if any(p is not None and p.is_meta for m in layer.modules() for p in m._parameters.values())
    ]
    if offloaded:
        raise TransplantStateError(
            f"the recipient's layers {offloaded} hold their weights on 'meta' (offloaded to disk or CPU by a "
            "device_map, or never loaded), so an organ grafted among them would lose its weights. Load the "
            "recipient without offloading (a device_map with no 'disk' or 'cpu'-offloaded layers), then transplant"
        )


def apply_transplant_plan(
    recipient: nn.Module, spec: ArchitectureSpec, plan: TransplantPlan, organ, incoming: list[nn.Module]
) -> Transplant:
    """Execute a checked plan with prepared incoming layers (all-or-nothing) and register the `Transplant`.

    Shared by `transplant_into` and `not_hub.excise` (a plan with no incoming layers).
    """
    stack = get_layer_stack(recipient, spec)
    neighbour = stack[min(plan.position, len(stack) - 1)] if plan.remove else stack[max(plan.position - 1, 0)]
    device, dtype = parameter_device_dtype(neighbour)
    hook = getattr(neighbour, "_hf_hook", None)
    entry = {
        "organ": organ.name_or_path or None,
        "organ_revision": getattr(organ, "organ_revision", None),
        "base_model": organ.config.base_model,
        "base_model_revision": organ.config.base_model_revision,
        "donor_layer_range": list(organ.config.layer_range),
        "position": plan.position,
        "mode": plan.mode,
        "num_layers": plan.insert,
        **({"removed_layers": plan.remove} if get_mode(plan.mode).removes == "given" else {}),
    }
    incoming_per_layer = _incoming_per_layer(organ, recipient, spec, plan)

    for layer in incoming:  # the incoming copies only: nothing of the recipient is touched yet
        point_layer_config(layer, recipient.config)
        layer.train(recipient.training)
        _follow_checkpointing(layer, stack)
        if hook is not None:
            _attach_device_hook(layer, device)
    transplants = [*getattr(recipient.config, "transplants", []), entry]
    removed, removed_per_layer = apply_plan(recipient, spec, plan, incoming, incoming_per_layer, transplants)

    transplant = Transplant(
        recipient=recipient,
        plan=plan,
        layers=incoming,
        entry=entry,
        _spec=spec,
        _organ_config=copy.deepcopy(organ.config),
        _organ_cls=type(organ),
        _routing={n: t.detach().to("cpu", copy=True) for n, t in organ.routing.named_buffers()}
        if hasattr(organ, "routing")
        else None,
        _removed=removed,
        _removed_per_layer=removed_per_layer,
        _placed_as=(device, dtype),
    )
    if not hasattr(recipient, _REGISTRY_ATTR):
        object.__setattr__(recipient, _REGISTRY_ATTR, [])
    getattr(recipient, _REGISTRY_ATTR).append(transplant)
    if get_mode(plan.mode).bridges:
        # Saving would write a checkpoint that reloads without the bridges (silently wrong weights): refuse it.
        recipient.__dict__["save_pretrained"] = refuse_bridge_save
    logger.info(
        "%s: %d layers out, %d in at position %d -> %d layers", plan.mode, plan.remove, plan.insert, plan.position,
        len(stack),
    )  # fmt: skip
    return transplant


@contextmanager
def transplanted(
    organ, recipient: nn.Module, *, position: int | None = None, mode: str | None = None, remove: int | None = None
) -> Iterator[Transplant]:
    """Transplant for the duration of a `with` block; the organ is explanted on exit, whatever happens inside.

    Example:
        ```python
        >>> with organ.transplanted(recipient, position=4, mode="insert") as t:
        ...     print(recipient.config.num_hidden_layers, t.layer_indices)
        ```
    """
    transplant = transplant_into(organ, recipient, position=position, mode=mode, remove=remove)
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


def transplants_of(recipient: nn.Module) -> list[Transplant]:
    """The live `Transplant`s of a recipient, oldest first."""
    return list(getattr(recipient, _REGISTRY_ATTR, []))


def _attach_device_hook(layer: nn.Module, device: torch.device) -> None:
    """Give an organ layer the accelerate hook its neighbours have, so inputs follow it to its device."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module  # optional: only device_map'd recipients

    add_hook_to_module(layer, AlignDevicesHook(execution_device=device, io_same_device=False))
