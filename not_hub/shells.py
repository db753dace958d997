"""The NOT training wrapper: an organ's layers between a donor's frozen embeddings and its final norm + LM head."""

from __future__ import annotations

from torch import nn

from .architectures import build_shell, point_layer_config, resolve_architecture


def standalone_shell(organ, donor: nn.Module):
    """The NOT standalone wrapper: `donor`'s frozen embeddings -> the organ's layers -> its final norm and LM head.

    Shares the donor's modules (no second copy of its weights) and runs the organ's own layer objects, so training
    the shell trains the organ.
    """
    indices = organ.config.layer_indices  # each layer's index in the model it came from
    per_layer = {
        name: [values[i] for i in indices]
        for name in resolve_architecture(donor).per_layer_config
        if isinstance(values := organ.config.donor_config.get(name), list)
    }
    shell = build_shell(donor, list(organ.layers), per_layer)
    for layer in organ.layers:
        point_layer_config(layer, shell.config)
    return shell
