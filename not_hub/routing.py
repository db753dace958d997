"""Organs from several teams in one model, each switched on only for text like what it was trained on.

`route(model)` gates every inserted organ of a grafted model (growth organs, or any organ grafted with
`mode="insert"`) by its routing signature (`not_hub.signature`): at the organ's slot, each token's hidden state is
scored against the signature, and the organ's output is used for a token only where the mean score over the tokens
so far (never later ones) is within the signature's threshold, after `min_tokens` of them. Elsewhere the organ is
skipped exactly: its block hands on the hidden state it received, bit for bit, so an organ gated off everywhere
leaves the base model's logits unchanged, and a model whose router selects nothing *is* the base model.

Only inserted organs are routed: skipped, an inserted organ is the identity. A replacing organ took the place of the
model's own layers, so skipping it would need those layers back; it is refused with a message.

The organ still runs on every token (its output is discarded where the gate is off), so its KV cache is whole and
a gate that opens later in a sequence sees the full history: cached generation gives what uncached generation gives.
Routing costs a distance per token per organ (a (C, k) projection) on top of running every organ.

    >>> model, tok = not_hub.load_grafted(["team-a/code-organ", "team-b/legal-organ"], routing="token")
    >>> model.generate(**tok("def add(a, b):", return_tensors="pt"))
    >>> not_hub.router_of(model).decisions   # organ -> (B, T) bool, the gates of the last forward
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .architectures import get_layer_stack
from .bridges import LayerWrapper
from .errors import InvalidArgumentError, TransplantStateError
from .signature import Signature, running_mean_gate
from .transplant import Transplant, transplants_of

_ROUTER_ATTR = "_not_hub_router"
MODES = ("token", "sequence")


@dataclass(eq=False)
class _GateState:
    """One organ's gate: the signature, the input its block received, the gate of the current forward, and the
    running sums of the current sequence (carried across cached decoding steps)."""

    name: str
    signature: Signature
    mode: str
    entry: torch.Tensor | None = None  # (B, T, C) hidden state entering the organ's first layer
    gate: torch.Tensor | None = None  # (B, T) bool
    sums: tuple[torch.Tensor, torch.Tensor] | None = None
    fixed: torch.Tensor | None = None  # (B,) bool: the sequence-mode decision, made at the end of the prompt
    tokens_on: int = 0
    tokens_seen: int = 0


class GatedLayer(LayerWrapper):
    """An organ layer inside a routed block: the first computes the gate from its input, the last applies it."""

    def __init__(self, layer: nn.Module, state: _GateState, first: bool, last: bool):
        super().__init__(layer)
        self.first, self.last = first, last
        object.__setattr__(self, "state", state)  # shared by the block's first and last layer, not a submodule

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        state = self.state
        if self.first:
            _open_gate(state, hidden_states, kwargs)
        out = self.layer(hidden_states, *args, **kwargs)
        if not self.last:
            return out
        hidden = out[0] if isinstance(out, tuple) else out
        # Gated off: the block's input, exactly (torch.where copies it bit for bit).
        routed = torch.where(state.gate[..., None].to(hidden.device), hidden, state.entry.to(hidden.dtype))
        state.entry = None
        return (routed, *out[1:]) if isinstance(out, tuple) else routed


def _positions(hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """(B, T) absolute positions of the tokens in this forward (0 = the sequence's first token)."""
    position_ids = kwargs.get("position_ids")
    if position_ids is not None:
        return position_ids.to(hidden.device).expand(hidden.shape[0], -1)
    cache_position = kwargs.get("cache_position")
    if cache_position is not None:
        return cache_position.to(hidden.device)[None, :].expand(hidden.shape[0], -1)
    return torch.arange(hidden.shape[1], device=hidden.device)[None, :].expand(hidden.shape[0], -1)


def _open_gate(state: _GateState, hidden: torch.Tensor, kwargs: dict) -> None:
    positions = _positions(hidden, kwargs)
    if state.sums is None or bool((positions[:, 0] == 0).all()):
        state.sums, state.fixed = None, None  # a new sequence
    valid = positions > 0  # the first token is an attention sink: it says nothing about the text
    distance = state.signature.distance(hidden)  # (B, T)
    gate, state.sums = running_mean_gate(distance, valid, state.signature, state.sums)
    if state.mode == "sequence":
        if state.fixed is None:  # decided once, from the whole prompt, for the prompt and what follows it
            state.fixed = gate[:, -1]
        gate = state.fixed[:, None].expand_as(gate)
    state.entry, state.gate = hidden, gate
    state.tokens_on += int(gate.sum())
    state.tokens_seen += gate.numel()


@dataclass(eq=False)
class Router:
    """The gates of a routed model (`route`): which organ was on for which token, and how often."""

    model: nn.Module
    states: dict[str, _GateState]
    _wrapped: list[tuple[Transplant, list[nn.Module]]] = field(default_factory=list)

    @property
    def decisions(self) -> dict[str, torch.Tensor | None]:
        """Organ name -> (B, T) bool gates of the last forward (None before the first)."""
        return {name: s.gate for name, s in self.states.items()}

    def share_on(self) -> dict[str, float]:
        """Organ name -> share of the tokens it was on for, over every forward since routing (or `reset_counts`)."""
        return {name: s.tokens_on / s.tokens_seen if s.tokens_seen else 0.0 for name, s in self.states.items()}

    def reset_counts(self) -> None:
        for s in self.states.values():
            s.tokens_on = s.tokens_seen = 0

    def set_threshold(self, name: str, threshold: float) -> None:
        """Move one organ's threshold (e.g. `-inf`: never on; `inf`: always on after `min_tokens`)."""
        if name not in self.states:
            raise InvalidArgumentError(f"no routed organ named {name!r}; routed: {sorted(self.states)}")
        self.states[name].signature.threshold = float(threshold)

    def remove(self) -> None:
        """Take the gates out: every organ runs on every token again, as grafted. The model is otherwise unchanged."""
        stack = get_layer_stack(self.model)
        where = {id(layer): i for i, layer in enumerate(stack)}
        for transplant, plain in self._wrapped:
            for wrapped, layer in zip(list(transplant.layers), plain, strict=True):
                if id(wrapped) in where:
                    stack[where[id(wrapped)]] = layer
            transplant.layers[:] = plain
        self._wrapped.clear()
        self.model.__dict__.pop(_ROUTER_ATTR, None)


def route(
    model: nn.Module,
    transplants: list[Transplant] | None = None,
    *,
    mode: str = "token",
    names: list[str] | None = None,
) -> Router:
    """Gate each inserted organ of `model` by its routing signature (see the module docstring).

    Args:
        model: a model with organs grafted (`transplant_into`, `OrganSet.transplant_into`, `load_grafted`).
        transplants: which (default: every live transplant of the model).
        mode: "token" (each token's gate from the tokens up to it: for scoring and generation) or "sequence"
            (decided once at the end of the prompt, then fixed: for generation).
        names: a name per transplant for `decisions` (default: the organ's repo id or `organ-<i>`).

    Returns:
        The `Router` (also `not_hub.router_of(model)`); `router.remove()` takes the gates out.

    Raises:
        InvalidArgumentError: `mode` unknown, no transplants, or one is not an insert, or has no signature (the
            message says how to compute one).
        TransplantStateError: the model is already routed.
    """
    if mode not in MODES:
        raise InvalidArgumentError(f"mode={mode!r} is not a routing mode; expected one of {MODES}")
    if router_of(model) is not None:
        raise TransplantStateError("this model is already routed; call not_hub.router_of(model).remove() first")
    transplants = list(transplants) if transplants is not None else transplants_of(model)
    if not transplants:
        raise InvalidArgumentError("nothing to route: graft organs first (transplant_into / load_grafted)")
    names = (
        list(names) if names is not None else [t.entry.get("organ") or f"organ-{i}" for i, t in enumerate(transplants)]
    )
    if len(set(names)) != len(names):
        names = [f"{n}#{i}" for i, n in enumerate(names)]
    signatures = []
    for name, t in zip(names, transplants, strict=True):
        if not t.active or t.recipient is not model:
            raise TransplantStateError(f"{name}: not a live transplant of this model")
        if t.mode != "insert":
            raise InvalidArgumentError(
                f"{name} is grafted with mode={t.mode!r}; only inserted organs (growth organs, mode='insert') can be "
                "routed, because skipped they are exactly the identity. Graft it with mode='insert', or leave it "
                "unrouted"
            )
        summary = t._organ_config.routing_signature
        if not summary or t._routing is None:
            raise InvalidArgumentError(
                f"{name} has no routing signature (trained before signatures existed, or not in situ): compute one "
                "from a few documents of its domain with not_hub.compute_routing_signature(organ, "
                "model, docs, tokenizer=tok), then graft it again"
            )
        signatures.append(Signature.from_parts(summary, t._routing))
    router = Router(model, {})
    stack = get_layer_stack(model)
    where = {id(layer): i for i, layer in enumerate(stack)}
    for name, t, signature in zip(names, transplants, signatures, strict=True):
        state = _GateState(name, signature, mode)
        plain = list(t.layers)
        wrapped = [GatedLayer(layer, state, first=i == 0, last=i == len(plain) - 1) for i, layer in enumerate(plain)]
        # Only the first and last layers need a wrapper; the middle ones stay as they are.
        wrapped = [w if (w.first or w.last) else layer for w, layer in zip(wrapped, plain, strict=True)]
        for w, layer in zip(wrapped, plain, strict=True):
            stack[where[id(layer)]] = w
        t.layers[:] = wrapped
        router.states[name] = state
        router._wrapped.append((t, plain))
    model.__dict__[_ROUTER_ATTR] = router
    return router


def router_of(model: nn.Module) -> Router | None:
    """The `Router` of a routed model, or None."""
    return model.__dict__.get(_ROUTER_ATTR)
