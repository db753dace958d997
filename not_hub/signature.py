"""What an organ was trained on, in a few KB: statistics of the hidden states entering its slot.

While an organ trains in situ (or is recovered), every training token's hidden state h (C,) entering the organ's first
layer is accumulated into a mean and a covariance (float64 sums). The first token of each block is left out: it is an
attention sink whose norm dwarfs every other token's in most models, and it says nothing about the text. The
signature keeps the mean `mean` (C,), the `k` leading principal directions `directions` (k, C) with their variances
`variances` (k,), and the mean variance per dimension of what those directions leave out (`residual_variance`).
A hidden state's distance from the organ's training data is

    x = h - mean;  a = directions @ x;  r = x - directions.T @ a
    d(h) = (sum_i a_i**2 / variances_i + |r|**2 / residual_variance) / C

which is about 1 on average over the training tokens (every term is a square normalised by its variance) and grows
for text unlike them. A router (`not_hub.routing`) gates the organ on where the mean of d over the tokens seen so far
is at most `threshold`: the 99th percentile of that running mean on held-out blocks of the organ's own data (the
validation blocks seen during training), from the `min_tokens`-th token on.

The tensors (mean, directions, variances: (k + 2) * C floats, 11.5 KB for SmolLM2 with k = 4) are saved in the organ's
`model.safetensors` beside its layers (sha256-checked as every tensor is); the scalars in `config.routing_signature`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

DEFAULT_DIRECTIONS = 4
DEFAULT_MIN_TOKENS = 8
THRESHOLD_QUANTILE = 0.99
_RESERVOIR_TOKENS = 16_384  # held-out token states kept to calibrate the threshold (64 MB at C = 1024, float32)


@dataclass
class Signature:
    """The statistics of an organ's training inputs (see the module docstring)."""

    mean: torch.Tensor  # (C,)
    directions: torch.Tensor  # (k, C), orthonormal rows
    variances: torch.Tensor  # (k,)
    residual_variance: float
    threshold: float
    min_tokens: int = DEFAULT_MIN_TOKENS
    tokens: int = 0

    def distance(self, hidden: torch.Tensor) -> torch.Tensor:
        """d(h) for hidden states (..., C): (...,) in float32."""
        x = hidden.detach().float() - self.mean.to(hidden.device, torch.float32)
        directions = self.directions.to(hidden.device, torch.float32)
        a = x @ directions.T  # (..., k)
        r = x - a @ directions  # (..., C)
        explained = (a.square() / self.variances.to(hidden.device, torch.float32)).sum(-1)
        return (explained + r.square().sum(-1) / self.residual_variance) / x.shape[-1]

    def summary(self) -> dict:
        """What `config.routing_signature` records (the tensors live in the weights file)."""
        return {
            "directions": int(self.directions.shape[0]),
            "hidden_size": int(self.mean.shape[0]),
            "residual_variance": self.residual_variance,
            "threshold": self.threshold,
            "threshold_quantile": THRESHOLD_QUANTILE,
            "min_tokens": self.min_tokens,
            "tokens": self.tokens,
            "first_token_excluded": True,
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "directions": self.directions, "variances": self.variances}

    @classmethod
    def from_parts(cls, summary: dict, tensors: dict[str, torch.Tensor]) -> Signature:
        return cls(
            mean=tensors["mean"].float(),
            directions=tensors["directions"].float(),
            variances=tensors["variances"].float(),
            residual_variance=float(summary["residual_variance"]),
            threshold=float(summary["threshold"]),
            min_tokens=int(summary.get("min_tokens", DEFAULT_MIN_TOKENS)),
            tokens=int(summary.get("tokens", 0)),
        )


class SignatureBuffers(nn.Module):
    """The signature's tensors as buffers of an `OrganModel` (so they are saved, hashed and loaded with it)."""

    def __init__(self, hidden_size: int, directions: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(hidden_size))
        self.register_buffer("directions", torch.zeros(directions, hidden_size))
        self.register_buffer("variances", torch.ones(directions))


def running_mean_gate(distance: torch.Tensor, valid: torch.Tensor, signature: Signature, sums=None):
    """Causal gate per token: on where the mean of d over the valid tokens so far (carried `sums`: (total, count)
    per row from earlier calls of the same sequence) is at most the threshold, after `min_tokens` of them.

    Args:
        distance: (B, T) d of each token; valid: (B, T) bool, tokens that count (not the first of a sequence).

    Returns:
        (gate (B, T) bool, new sums).
    """
    d = torch.where(valid, distance, torch.zeros_like(distance)).double()
    n = valid.double()
    total, count = d.cumsum(-1), n.cumsum(-1)
    if sums is not None:
        total, count = total + sums[0][:, None], count + sums[1][:, None]
    mean = total / count.clamp(min=1)
    gate = (count >= signature.min_tokens) & (mean <= signature.threshold)
    return gate, (total[:, -1], count[:, -1])


class SignatureCollector:
    """Accumulates a signature from the hidden states entering a layer, through a forward pre-hook on it: the sums
    from training-mode forwards, held-out token states (for the threshold) from eval-mode forwards (validation)."""

    def __init__(self, layer: nn.Module, directions: int = DEFAULT_DIRECTIONS, min_tokens: int = DEFAULT_MIN_TOKENS):
        self.k, self.min_tokens = directions, min_tokens
        self.sum: torch.Tensor | None = None
        self.outer: torch.Tensor | None = None
        self.count = 0
        self.held: list[torch.Tensor] = []  # (T-1, C) per held-out block, float32
        self.fallback: list[torch.Tensor] = []  # training blocks, if no validation ran
        self.handle = layer.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        if hidden is None or hidden.dim() != 3 or hidden.shape[1] < 2:
            return
        x = hidden.detach()[:, 1:].float()  # (B, T-1, C): the first token of a block is an attention sink
        if module.training:
            flat = x.reshape(-1, x.shape[-1])  # (N, C) float32: one batch's products in float32 (~0.2% of a
            if self.sum is None:  # training step), summed over the run in float64
                self.sum = torch.zeros(flat.shape[-1], dtype=torch.float64, device=flat.device)
                self.outer = torch.zeros(flat.shape[-1], flat.shape[-1], dtype=torch.float64, device=flat.device)
            self.sum += flat.sum(0).double()
            self.outer += (flat.T @ flat).double()
            self.count += flat.shape[0]
            target = self.fallback
        else:
            target = self.held
        room = _RESERVOIR_TOKENS - sum(t.shape[0] for t in target)
        for row in x[: max(0, -(-room // x.shape[1]))]:  # whole blocks, until the reservoir is full
            target.append(row.to("cpu", copy=True))

    def remove(self) -> None:
        self.handle.remove()

    def finish(self) -> Signature | None:
        """The signature, or None if no training tokens were seen (e.g. a run resumed after its last step)."""
        self.remove()
        if not self.count or self.count <= self.k + 1:
            return None
        mean = self.sum / self.count
        cov = self.outer / self.count - torch.outer(mean, mean)
        values, vectors = torch.linalg.eigh(cov)  # ascending
        values, vectors = values.flip(0).clamp(min=1e-12), vectors.flip(1)
        k = min(self.k, values.shape[0] - 1)
        residual = float(values[k:].sum() / (values.shape[0] - k))
        top = vectors[:, :k].T  # (k, C); an eigenvector's sign is arbitrary: make its largest entry positive
        top = top * torch.sign(top.gather(1, top.abs().argmax(1, keepdim=True)))
        signature = Signature(
            mean=mean.float().cpu(),
            directions=top.contiguous().float().cpu(),
            variances=values[:k].float().cpu(),
            residual_variance=max(residual, 1e-12),
            threshold=float("inf"),
            min_tokens=self.min_tokens,
            tokens=self.count,
        )
        blocks = self.held or self.fallback
        signature.threshold = calibrate(signature, blocks)
        return signature


def calibrate(signature: Signature, blocks: list[torch.Tensor]) -> float:
    """The `THRESHOLD_QUANTILE` quantile of the causal running mean of d over `blocks` ((T-1, C) each, first token
    already left out), from the `min_tokens`-th token on."""
    means = []
    for block in blocks:
        d = signature.distance(block)  # (T-1,)
        running = d.double().cumsum(0) / torch.arange(1, d.shape[0] + 1, dtype=torch.float64)
        means.append(running[signature.min_tokens - 1 :])
    if not means or not sum(m.numel() for m in means):
        return float("inf")
    return float(torch.quantile(torch.cat(means).float(), THRESHOLD_QUANTILE))
