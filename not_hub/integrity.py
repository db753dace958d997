"""sha256 of tensors and of config files: what makes a tampered organ checkpoint detectable."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes in its own dtype (contiguous, on CPU)."""
    data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(memoryview(data)).hexdigest()  # the tensor's own memory: no copy


def config_sha256(config_dict: dict[str, Any]) -> str:
    """sha256 of a config's canonical JSON (sorted keys), independent of whitespace and key order."""
    canonical = json.dumps(config_dict, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()
