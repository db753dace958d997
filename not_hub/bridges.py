"""Trainable linear bridges around an organ (bridge-mediated insertion).

A bridge is a `hidden -> hidden` linear map, identity-initialised (weight = I, bias = 0) so that an untrained bridge
changes nothing: h @ I^T + 0 == h exactly in floating point. `bridge_in` adapts the recipient's hidden state to what
the organ expects; `bridge_out` maps the organ's output back. In the recipient's layer stack they live inside
`BridgedLayer` wrappers around the organ's first and last layers, so every family's own forward loop runs them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def identity_bridge(
    hidden_size: int, dtype: torch.dtype | None = None, device: torch.device | None = None
) -> nn.Linear:
    """A `hidden_size -> hidden_size` linear layer initialised to the identity."""
    bridge = nn.Linear(hidden_size, hidden_size, bias=True, dtype=dtype, device=device)
    with torch.no_grad():
        bridge.weight.copy_(torch.eye(hidden_size, dtype=bridge.weight.dtype))
        bridge.bias.zero_()
    return bridge


class LayerWrapper(nn.Module):
    """A decoder layer inside a wrapper that sits in the recipient's layer stack in its place (`BridgedLayer`, a
    routing gate). Attribute lookups the wrapper does not answer (e.g. `attention_type`, read by some families'
    forward loops) are passed to the wrapped layer, so the model treats it as the layer itself; `unwrap` looks
    through it."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("layer"), name)


class BridgedLayer(LayerWrapper):
    """A decoder layer with an optional bridge before it and/or after it."""

    def __init__(self, layer: nn.Module, bridge_in: nn.Linear | None = None, bridge_out: nn.Linear | None = None):
        super().__init__(layer)
        self.bridge_in = bridge_in
        self.bridge_out = bridge_out

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        if self.bridge_in is not None:
            hidden_states = self.bridge_in(hidden_states)  # (B, T, C) -> (B, T, C)
        out = self.layer(hidden_states, *args, **kwargs)
        if self.bridge_out is None:
            return out
        if isinstance(out, tuple):  # families that still return (hidden_states, ...)
            return (self.bridge_out(out[0]), *out[1:])
        return self.bridge_out(out)


def unwrap(layer: nn.Module) -> nn.Module:
    """The decoder layer inside a `BridgedLayer` or a routing gate (`not_hub.routing.GatedLayer`), or the layer."""
    while isinstance(layer, LayerWrapper):
        layer = layer.layer
    return layer
