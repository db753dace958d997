"""Probes: what a model's decoder layers receive, recorded so an organ can be run on it (parity checks)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .architectures import get_layer_stack


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
