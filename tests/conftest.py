import hashlib
import os
import sys
from pathlib import Path

import pytest
import torch

# Training's default precision is "auto" (bf16 autocast where the processor does bf16 natively: see
# not_hub.precision); the suite's parity tests compare float32 runs bit for bit, so it trains in float32 unless a test
# says otherwise. This is the variable `accelerate launch --mixed_precision` sets, which "auto" honours.
os.environ["ACCELERATE_MIXED_PRECISION"] = "no"
# Tests never reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Parallel workers (pytest -n): one thread each, subprocesses included. Workers with two OpenMP threads each on
    # two cores spin against each other and run some tests 10x slower.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))


def state_hash(model: torch.nn.Module) -> str:
    """sha256 over every tensor's name, shape, dtype and bytes, plus the config: "unchanged" means bit-identical."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().contiguous().cpu()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(model.config.to_json_string().encode())
    return h.hexdigest()


@pytest.fixture
def hash_state():
    return state_hash


def pytest_collection_finish(session):
    """Move what collection built (torch, transformers, peft, the test modules) out of the garbage collector's view.

    accelerate's `free_memory()`, called by every `transformers.Trainer` run and by not_hub's, runs a full
    `gc.collect()`, which walks every tracked object: with the whole stack imported, about 0.25 s each time, and the
    suite trains more than a hundred times. A collection first frees what is garbage already; what is left (modules,
    classes, the collected test items) lives as long as the worker, so freezing it (`gc.freeze()`) changes what
    later collections walk, not what they free.
    """
    import gc

    gc.collect()
    gc.freeze()
