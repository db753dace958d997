"""What every `not-hub` command shares: argument types that refuse bad values up front, model loading, output
checks. Bad values are usage errors (argparse exits 2 with one line); they never reach the library reinterpreted
(`--epochs 0` never trains a step, `--stride 0` never means "default")."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from ..errors import OutputPathError
from ..loading import load_causal_lm


def _number(kind, text: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = _number(int, text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed; expected an integer >= 1")
    return value


def block_size(text: str) -> int:
    """An integer >= 2 (a block or window needs one token of context)."""
    value = _number(int, text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"{value} is not allowed; expected an integer >= 2")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    value = _number(int, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is not allowed; expected an integer >= 0")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = _number(float, text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not allowed; expected a number > 0")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1)."""
    value = _number(float, text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed; expected a fraction in [0, 1)")
    return value


def model_options(p: argparse.ArgumentParser, revision_help: str, recipient: bool = False) -> None:
    """`--gguf-file`, `--revision` (and `--recipient-revision`): how every command names a model's files."""
    p.add_argument(
        "--gguf-file", default=None, help="GGUF file name inside the model folder or repo (converted once, cached)"
    )
    p.add_argument("--revision", default=None, help=revision_help)
    if recipient:
        p.add_argument(
            "--recipient-revision", default=None, help="branch, tag or commit sha of the recipient model repo"
        )


def output_folder(path: str | None, what: str = "--out") -> None:
    """Refuse, before any work, an output path that is an existing file (checkpoints are folders)."""
    if path and Path(path).exists() and not Path(path).is_dir():
        raise OutputPathError(f"{what} {path!r} is an existing file; pass a folder path (it is created if needed)")


def load_model(args, name: str, revision: str | None = None):
    """Load a model and tokenizer for a command, saying what was loaded and how long it took."""
    t0 = time.perf_counter()
    model, tokenizer = load_causal_lm(name, gguf_file=args.gguf_file, revision=revision)
    print(
        f"loaded {model.name_or_path} ({model.config.model_type}, {model.config.num_hidden_layers} layers) "
        f"in {time.perf_counter() - t0:.1f}s"
    )
    return model, tokenizer
