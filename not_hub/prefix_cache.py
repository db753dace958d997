"""In-situ training at close to standalone speed: the frozen layers below the organ are run once, not every epoch.

In-situ training puts the organ at its slot inside the frozen donor, so the layers below it ([0, start)) see the
same input every epoch and give the same output: the hidden state entering layer `start`. `PrefixCache` computes
that output once per block, without gradients, and keeps it in memory (within a byte budget) or in a memory-mapped
safetensors file. `cached_model` then trains on a shell of the donor in which one stand-in module replaces the
prefix layers and returns the cached hidden state of the current batch; everything else (embedding lookup, rotary
positions, masks, the organ, the layers above it, final norm, head, logit soft-capping) is the family's own forward,
so the losses equal the uncached run's within float tolerance. Cost per token: `hidden_size * 4` bytes (fp32).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .architectures import build_shell, get_layer_stack, resolve_architecture
from .errors import InvalidArgumentError

logger = logging.getLogger(__name__)

DEFAULT_MEMORY_LIMIT = 2 * 2**30  # bytes of cached hidden states kept in memory; more goes to a mapped file
_KEY = "hidden_states"


class _Stop(Exception):
    """Raised by the capture hook: everything above the prefix is not needed while filling the cache."""


def prefix_dropout(model: nn.Module, start: int) -> str | None:
    """The first dropout that would act below layer `start` in training mode (a cached prefix runs without it, so
    the cached run would differ from the uncached one), or None."""
    stack = get_layer_stack(model)
    above = {id(m) for layer in list(stack)[start:] for m in layer.modules()}
    for name, module in model.named_modules():
        if id(module) in above:
            continue
        if isinstance(module, nn.Dropout) and module.p > 0:
            return f"{name} (p={module.p})"
        for attr in ("attention_dropout", "attn_dropout", "dropout_p"):
            value = getattr(module, attr, None)
            if isinstance(value, float) and value > 0:
                return f"{name}.{attr}={value}"
    return None


class PrefixCache:
    """The hidden state entering decoder layer `start`, (T, C) per block, looked up by the block's token ids.

    Attributes:
        start: the first layer *not* covered by the cache (the organ's first layer).
        nbytes: bytes of cached hidden states. bytes_per_token: `nbytes / tokens` (hidden_size * element size).
        path: the safetensors file backing the cache when it exceeded the memory limit (else None).
    """

    def __init__(
        self, start: int, rows: dict[bytes, int], tensor: torch.Tensor | None, path: Path | None, shape, dtype
    ):
        self.start, self._rows, self._tensor, self.path, self.shape, self.dtype = (
            start,
            rows,
            tensor,
            path,
            shape,
            dtype,
        )
        self._file = safe_open(str(path), framework="pt") if path is not None else None
        self.returns_tuple = False
        self.source: tuple = ()  # which weights (and which in-place version of them) produced the cache

    @property
    def nbytes(self) -> int:
        n, t, c = self.shape
        return n * t * c * self.dtype.itemsize

    @property
    def bytes_per_token(self) -> int:
        return self.shape[2] * self.dtype.itemsize

    def covers(self, blocks: list[torch.Tensor]) -> bool:
        """Whether every block (rows of (N, T) token ids) was seen when the cache was built."""
        return all(row.numpy().tobytes() in self._rows for ids in blocks for row in ids.to(torch.int64))

    def check_reuse(self, model: nn.Module, start: int, blocks: list[torch.Tensor]) -> None:
        """Refuse to reuse this cache for another model, another slot, changed weights or unseen blocks."""
        problems = []
        if start != self.start:
            problems.append(f"it holds the input of layer {self.start}, the organ starts at layer {start}")
        if _fingerprint(model, self.start) != self.source:
            problems.append("it was built from another model, or the frozen weights below the organ changed since")
        if not problems and not self.covers(blocks):
            problems.append("some training or validation blocks were not seen when it was built")
        if problems:
            raise InvalidArgumentError(
                f"prefix_cache cannot be reused: {'; '.join(problems)}. Build it with PrefixCache.build(model, "
                f"{start}, blocks) from this model and these blocks, or pass prefix_cache=None"
            )

    def lookup(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Cached hidden states (B, T, C) of a batch of blocks (B, T) seen when the cache was built."""
        keys = [row.numpy().tobytes() for row in input_ids.detach().to("cpu", torch.int64)]
        try:
            index = [self._rows[key] for key in keys]
        except KeyError:
            raise AssertionError("a block the prefix cache was not built for") from None  # internal invariant
        if self._tensor is not None:
            return self._tensor[index]
        part = self._file.get_slice(_KEY)
        return torch.stack([part[i] for i in index])

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        model: nn.Module,
        start: int,
        blocks: list[torch.Tensor],
        *,
        batch_size: int = 8,
        memory_limit: int = DEFAULT_MEMORY_LIMIT,
        cache_dir: str | os.PathLike | None = None,
    ) -> PrefixCache:
        """Run `model`'s layers [0, start) once over every distinct block (each a (N, T) tensor of token ids)."""
        stack = get_layer_stack(model)
        rows: dict[bytes, int] = {}
        unique = []
        for ids in blocks:
            for row in ids.to(torch.int64):
                key = row.numpy().tobytes()
                if key not in rows:
                    rows[key] = len(unique)
                    unique.append(row)
        captured: list[torch.Tensor] = []
        returns_tuple = [False]

        def capture(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            captured.append(hidden.detach().to("cpu"))
            raise _Stop

        def kind(module, args, output):
            returns_tuple[0] = isinstance(output, tuple)

        handles = [stack[start].register_forward_pre_hook(capture, with_kwargs=True)]
        if start > 0:
            handles.append(stack[start - 1].register_forward_hook(kind))
        # Frozen layers run without dropout here; the uncached run matches when the family's dropout is 0 (the
        # default of every decoder family not_hub knows).
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        try:
            for i in range(0, len(unique), batch_size):
                ids = torch.stack(unique[i : i + batch_size]).to(device)
                try:
                    model(input_ids=ids, use_cache=False)
                except _Stop:
                    pass
        finally:
            for handle in handles:
                handle.remove()
            model.train(was_training)
        hidden = torch.cat(captured) if captured else torch.empty(0)
        shape = tuple(hidden.shape)
        if hidden.numel() * hidden.element_size() <= memory_limit:
            cache = cls(start, rows, hidden, None, shape, hidden.dtype)
        else:
            folder = Path(cache_dir) if cache_dir is not None else Path(tempfile.mkdtemp(prefix="not_hub-prefix-"))
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"prefix-{start}.safetensors"
            save_file({_KEY: hidden.contiguous()}, path)
            dtype = hidden.dtype
            del hidden
            cache = cls(start, rows, None, path, shape, dtype)
        cache.returns_tuple = returns_tuple[0]
        cache.source = _fingerprint(model, start)
        logger.info(
            "prefix cache: %d blocks, %.1f MB (%d bytes per token) %s",
            shape[0] if shape else 0,
            cache.nbytes / 1e6,
            cache.bytes_per_token if shape else 0,
            f"mapped from {cache.path}" if cache.path else "in memory",
        )
        return cache


def blocks_to_cache(data) -> list[torch.Tensor]:
    """The token-id blocks a prefix cache for `data` (a `BlockData`) must hold: training, and validation if any."""
    blocks = [data.train[:]["input_ids"]]
    if data.validation is not None:
        blocks.append(data.validation[:]["input_ids"])
    return blocks


def _fingerprint(model: nn.Module, start: int) -> tuple:
    """Identity of the weights that produce the cached states: every parameter and buffer outside layers
    [start, ...), by storage and in-place version (an optimizer step or `load_state_dict` bumps the version)."""
    above = {id(t) for layer in list(get_layer_stack(model))[start:] for t in (*layer.parameters(), *layer.buffers())}
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return tuple((name, t.data_ptr(), t._version) for name, t in tensors if id(t) not in above)


class _CachedPrefix(nn.Module):
    """Stands in for the frozen layers [0, start): returns their cached output for the current batch.

    Attribute lookups it does not answer (e.g. `attention_type`, read by some families' layer loops) go to the last
    prefix layer, so the family treats it as that layer.
    """

    def __init__(self, cache: PrefixCache, reference: nn.Module):
        super().__init__()
        self.cache = cache
        self.current: torch.Tensor | None = None
        object.__setattr__(self, "_reference", reference)  # not a submodule: its weights are not part of the shell

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_reference"], name)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        out = self.current.to(device=hidden_states.device, dtype=hidden_states.dtype)  # (B, T, C)
        return (out,) if self.cache.returns_tuple else out


class CachedPrefixModel(nn.Module):
    """`model` with its layers [0, start) replaced by a `PrefixCache` lookup; called like the causal LM."""

    def __init__(self, model: nn.Module, cache: PrefixCache):
        super().__init__()
        spec = resolve_architecture(model)
        stack = list(get_layer_stack(model, spec))
        start = cache.start
        per_layer = {
            name: [values[max(start - 1, 0)], *values[start:]]
            for name in spec.per_layer_config
            if isinstance(values := getattr(model.config, name, None), list)
        }
        self.stand_in = _CachedPrefix(cache, stack[max(start - 1, 0)])
        # The layers keep reading the donor's config (their per-layer entries are indexed by their donor layer_idx).
        self.shell = build_shell(model, [self.stand_in, *stack[start:]], per_layer)
        self.config = self.shell.config

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **kwargs: Any):
        self.stand_in.current = self.stand_in.cache.lookup(input_ids)
        try:
            return self.shell(input_ids=input_ids, labels=labels, **kwargs)
        finally:
            self.stand_in.current = None
