"""Shared pieces of the benchmarks: the model, the machine description, result files."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DATA = Path(os.environ.get("NOT_HUB_DATA", ROOT.parent / "shared" / "data"))


def machine() -> dict:
    import accelerate
    import peft
    import transformers

    import not_hub

    cpu = platform.processor() or "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
        "not_hub": not_hub.__version__,
        "dtype": "float32",
    }


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path


def write_markdown(name: str, text: str) -> Path:
    path = RESULTS / f"{name}.md"
    path.write_text(text)
    return path


def run_fresh(script: str, args: list[str], payload, env: dict[str, str], what: str):
    """Run `script` in a fresh Python process with `args`, then the path of `payload` written as JSON; return the JSON
    its last line of output holds (the benchmarks' pull-by-repo-id-and-score step)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(payload, f)
    try:
        out = subprocess.run(
            [sys.executable, "-c", script, *args, f.name], capture_output=True, text=True, env={**os.environ, **env}
        )
    finally:
        os.unlink(f.name)
    if out.returncode != 0:
        raise RuntimeError(f"{what} in a fresh process failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def recorded(path: Path, run, timing_key: str = "wall_clock_s") -> tuple[dict, bool]:
    """What is on record at `path`, or `run()`'s result with its wall-clock written there atomically (so a killed run
    leaves no half-written record); and whether it ran now."""
    if path.is_file():
        return json.loads(path.read_text()), False
    started = time.time()
    out = run()
    out[timing_key] = round(time.time() - started, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=2, default=str))
    os.replace(tmp, path)
    return out, True


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        return False


def load_smollm2():
    from not_hub.loading import load_causal_lm

    return load_causal_lm("smollm2")


def preset_parser(doc: str) -> argparse.ArgumentParser:
    """The benchmarks' command line: `--quick` (smoke, the default) or `--full` (the committed results)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="smoke preset (default)")
    group.add_argument("--full", action="store_true", help="the preset whose results are committed")
    return parser
