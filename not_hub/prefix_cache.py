"""In-situ training at close to standalone speed: the frozen layers below the organ run once per block, not per visit.

In-situ training puts the organ at its slot inside the frozen donor, so the layers below it ([0, start)) give the
same output every time a block is seen: the hidden state entering layer `start`. `PrefixCache` keeps that output
the first time training (or validation) visits a block and hands it back on later visits. It fills lazily: no pass
over the corpus before the first step, so the first epoch costs what the uncached run costs and a corpus seen once
costs nothing extra; only repeated blocks (later epochs, validation) get cheaper. It stays within a memory limit
and then a disk limit (an anonymous temporary file, which the OS deletes when the process ends, crash included);
blocks beyond both are recomputed. `CachedPrefixModel` trains on a shell of the donor in which one stand-in module
replaces the prefix layers and returns the hidden state of the current batch; everything else (embedding lookup,
rotary positions, masks, the organ, the layers above it, final norm, head, soft-capping) is the family's own
forward, so the losses equal the uncached run's within float tolerance. Cost: `hidden_size * 4` bytes per token.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from typing import Any

import torch
from torch import nn

from .architectures import build_shell, get_layer_stack, resolve_architecture
from .errors import InvalidArgumentError

logger = logging.getLogger(__name__)

DEFAULT_MEMORY_LIMIT = 2 * 2**30  # bytes of cached hidden states kept in memory
DEFAULT_DISK_LIMIT = 16 * 2**30  # then this many bytes in an anonymous temporary file; beyond, recomputed


class _Stop(Exception):
    """Raised by the capture hook: everything above the prefix is not needed while computing it."""


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


def _key(row: torch.Tensor) -> bytes:
    # 16 bytes per block instead of its token ids (2 KB for 256 int64 tokens): keys of a 10M-token corpus fit in MBs.
    return hashlib.blake2b(row.numpy().tobytes(), digest_size=16).digest()


class PrefixCache:
    """The hidden state entering decoder layer `start`, (T, C) per block, kept as training first visits each block.

    Args:
        model: the donor (its layers [0, start) are run, without gradients, on a block not cached yet).
        start: the first layer *not* covered by the cache (the organ's first layer).
        memory_limit: bytes of hidden states kept in memory.
        disk_limit: bytes kept after that in an anonymous temporary file (in `cache_dir`, default the system's
            temporary folder; it has no name, so nothing is left behind even by a crash).
        cache_dir: where that file lives.
        shared: record a hash of the frozen weights, so the cache can be checked when another run reuses it
            (`train_organ(prefix_cache=...)`); a cache used by one run only may skip it.

    Attributes:
        hits / misses: block lookups answered from the cache / computed. uncached: computed blocks that did not fit.
        memory_bytes / disk_bytes: bytes held in each. bytes_per_token: hidden_size * element size.
    """

    def __init__(
        self,
        model: nn.Module,
        start: int,
        *,
        memory_limit: int = DEFAULT_MEMORY_LIMIT,
        disk_limit: int = DEFAULT_DISK_LIMIT,
        cache_dir: str | os.PathLike | None = None,
        shared: bool = True,
    ):
        for name, value in (("memory_limit", memory_limit), ("disk_limit", disk_limit)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidArgumentError(f"{name}={value!r} is not allowed; expected a number of bytes >= 0")
        self.model, self.start = model, start
        self.memory_limit, self.disk_limit, self.cache_dir = memory_limit, disk_limit, cache_dir
        self._memory: dict[bytes, torch.Tensor] = {}
        self._disk: dict[bytes, tuple[int, tuple[int, int]]] = {}  # key -> (byte offset in the file, (T, C))
        self._file = None
        self.memory_bytes = self.disk_bytes = 0
        self.hits = self.misses = self.uncached = 0
        self.returns_tuple = False
        self.row_shape: tuple[int, int] | None = None  # (T, C)
        self.dtype: torch.dtype | None = None
        # A hash of the frozen weights that produce the states, checked when the cache is reused; a cache private to
        # one run (`shared=False`, as train_organ builds its own) skips it: reading every frozen byte costs ~0.3 s.
        self.source = _fingerprint(model, start) if shared else None

    @property
    def nbytes(self) -> int:
        return self.memory_bytes + self.disk_bytes

    @property
    def bytes_per_token(self) -> int:
        return self.row_shape[1] * self.dtype.itemsize if self.row_shape else 0

    def stats(self) -> dict[str, Any]:
        """What the cache held and did (stored in the organ's training metadata)."""
        return {
            "bytes": self.nbytes,
            "memory_bytes": self.memory_bytes,
            "disk_bytes": self.disk_bytes,
            "bytes_per_token": self.bytes_per_token,
            "blocks": len(self._memory) + len(self._disk),
            "hits": self.hits,
            "misses": self.misses,
            "uncached": self.uncached,
            "memory_limit": self.memory_limit,
            "disk_limit": self.disk_limit,
        }

    def check_reuse(self, model: nn.Module, start: int) -> None:
        """Refuse to reuse this cache for another model, another slot or changed weights."""
        problems = []
        if start != self.start:
            problems.append(f"it holds the input of layer {self.start}, the organ starts at layer {start}")
        if self.source is None:
            problems.append("it was built with shared=False, so the weights it came from were not recorded")
        elif model is not self.model or _fingerprint(model, self.start) != self.source:
            problems.append("it was built from another model, or the frozen weights below the organ changed since")
        if problems:
            raise InvalidArgumentError(
                f"prefix_cache cannot be reused: {'; '.join(problems)}. Make one with PrefixCache(model, {start}) "
                "from this model, or pass prefix_cache=None"
            )

    def __contains__(self, row: torch.Tensor) -> bool:
        key = _key(row.detach().to("cpu", torch.int64))
        return key in self._memory or key in self._disk

    def lookup(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, T, C) entering layer `start` for a batch of blocks (B, T): cached, or computed now
        (and kept if there is room)."""
        rows = input_ids.detach().to("cpu", torch.int64)
        keys = [_key(row) for row in rows]
        out: list[torch.Tensor | None] = [None] * len(keys)
        missing = []
        for i, key in enumerate(keys):
            if key in self._memory:
                out[i] = self._memory[key]
            elif key in self._disk:
                out[i] = self._read(*self._disk[key])
            else:
                missing.append(i)
        self.hits += len(keys) - len(missing)
        if missing:
            hidden = self._compute(input_ids[missing])
            self.misses += len(missing)
            for j, i in enumerate(missing):
                out[i] = hidden[j]
                self._store(keys[i], hidden[j])
        return torch.stack(out)

    def fill(self, blocks: list[torch.Tensor], batch_size: int = 8) -> PrefixCache:
        """Compute and keep the states of these blocks ((N, T) tensors of token ids) now, e.g. once for a sweep."""
        for ids in blocks:
            for i in range(0, len(ids), batch_size):
                self.lookup(ids[i : i + batch_size])
        return self

    @classmethod
    def build(cls, model: nn.Module, start: int, blocks: list[torch.Tensor], *, batch_size: int = 8, **limits):
        """A cache of `model` at `start` already holding `blocks` (see `fill`)."""
        return cls(model, start, **limits).fill(blocks, batch_size)

    def close(self) -> None:
        """Drop every cached state and close the temporary file (the OS frees its space)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._memory.clear()
        self._disk.clear()
        self.memory_bytes = self.disk_bytes = 0

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    # -- storage ---------------------------------------------------------------------------------------------
    def _store(self, key: bytes, hidden: torch.Tensor) -> None:
        size = hidden.numel() * hidden.element_size()
        if self.memory_bytes + size <= self.memory_limit:
            self._memory[key] = hidden.clone()  # a row of a batch tensor would keep the whole batch alive
            self.memory_bytes += size
        elif self.disk_bytes + size <= self.disk_limit:
            try:
                if self._file is None:
                    # No name on disk (O_TMPFILE / unlinked at once): nothing to clean up after a crash.
                    self._file = tempfile.TemporaryFile(prefix="not_hub-prefix-", dir=self.cache_dir)
                data = hidden.contiguous().view(torch.uint8).numpy().tobytes()
                if os.pwrite(self._file.fileno(), data, self.disk_bytes) != len(data):
                    raise OSError(28, "short write")
            except OSError as err:
                # A full (or unwritable) cache disk costs speed, not the run: what is cached stays, the rest is
                # recomputed from here on.
                logger.warning(
                    "prefix cache: writing to %s failed (%s); caching no more on disk, the remaining blocks are "
                    "recomputed", self.cache_dir or tempfile.gettempdir(), err,
                )  # fmt: skip
                self.disk_limit = self.disk_bytes
                self.uncached += 1
                return
            self._disk[key] = (self.disk_bytes, tuple(hidden.shape))  # (blocks of several sizes may share a cache)
            self.disk_bytes += size
        else:
            self.uncached += 1

    def _read(self, offset: int, shape: tuple[int, int]) -> torch.Tensor:
        t, c = shape
        size = t * c * self.dtype.itemsize
        raw = bytearray(os.pread(self._file.fileno(), size, offset))
        return torch.frombuffer(raw, dtype=torch.uint8).view(self.dtype).view(t, c)

    @torch.no_grad()
    def _compute(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Run the donor up to layer `start` (its own forward: embeddings, positions, masks) and capture the input."""
        stack = get_layer_stack(self.model)
        captured: list[torch.Tensor] = []

        def capture(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            captured.append(hidden.detach().to("cpu"))
            raise _Stop

        def kind(module, args, output):
            self.returns_tuple = isinstance(output, tuple)

        handles = [stack[self.start].register_forward_pre_hook(capture, with_kwargs=True)]
        if self.start > 0:
            handles.append(stack[self.start - 1].register_forward_hook(kind))
        # Frozen layers run without dropout; training refuses the cache when the family has dropout below the organ.
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        device = next(self.model.parameters()).device
        try:
            self.model(input_ids=input_ids.to(device), use_cache=False)
        except _Stop:
            pass
        finally:
            for handle in handles:
                handle.remove()
            for module, mode in modes:
                module.training = mode
        hidden = captured[0]
        self.row_shape, self.dtype = tuple(hidden.shape[1:]), hidden.dtype
        return hidden


def _fingerprint(model: nn.Module, start: int) -> str:
    """Identity of the weights that produce the cached states, by content: a hash of the bytes of every parameter and
    buffer outside layers [start, ...). Storage pointers and in-place version counters are not enough: a change made
    through `.data` (or by a loader writing into the same storage) bumps neither, and a shared cache would then hand a
    second run the hidden states of the old weights. Hashing reads each frozen byte once (~0.3 s for SmolLM2-135M's
    embeddings and 10 layers), when a cache is made and when one is reused."""
    above = {id(t) for layer in list(get_layer_stack(model))[start:] for t in (*layer.parameters(), *layer.buffers())}
    digest = hashlib.blake2b(digest_size=16)
    seen: set[int] = set()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if id(t) in above or id(t) in seen:
            continue
        seen.add(id(t))
        data = t.detach()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)};".encode())
        if data.device.type == "meta":
            continue
        data = data.to("cpu").contiguous().reshape(-1)
        digest.update(data.view(torch.uint8).numpy() if data.numel() else b"")
    return digest.hexdigest()


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
        # What transformers.Trainer reads to count a causal LM's loss tokens (labels shifted by one) and the input
        main_input_name = "input_ids"
        self.loss_type = getattr(self.shell, "loss_type", None)
        self.main_input_name = main_input_name

    def activation_checkpointing_enable(self, *args: Any, **kwargs: Any) -> None:
        """Gradient (activation) checkpointing of the layers above the cached prefix (the shell's own)."""
        enable = (
            getattr(self.shell, "activation_checkpointing_enable", None) or self.shell.gradient_checkpointing_enable
        )
        enable(*args, **kwargs)

    def activation_checkpointing_disable(self) -> None:
        disable = getattr(self.shell, "activation_checkpointing_disable", None)
        (disable or self.shell.gradient_checkpointing_disable)()

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **kwargs: Any):
        self.stand_in.current = self.stand_in.cache.lookup(input_ids)
        try:
            return self.shell(input_ids=input_ids, labels=labels, **kwargs)
        finally:
            self.stand_in.current = None
