"""What every `not-hub` command shares: argument types that refuse bad values up front, model loading, output
checks. Bad values are usage errors (argparse exits 2 with one line); they never reach the library reinterpreted
(`--epochs 0` never trains a step, `--stride 0` never means "default")."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from ..errors import OutputPathError
from ..grafted import _load_organ_or_set
from ..loading import load_causal_lm
from ..modeling_organ import OrganModel


def _number(kind, text: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _int_at_least(minimum: int, why: str = ""):
    """An argparse type: an integer >= `minimum`."""

    def parse(text: str) -> int:
        value = _number(int, text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is not allowed; expected an integer >= {minimum}")
        return value

    parse.__doc__ = f"An integer >= {minimum}{why}."
    return parse


positive_int = _int_at_least(1)
block_size = _int_at_least(2, " (a block or window needs one token of context)")
non_negative_int = _int_at_least(0)


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
    token_option(p)
    if recipient:
        p.add_argument(
            "--recipient-revision", default=None, help="branch, tag or commit sha of the recipient model repo"
        )


def token_option(p: argparse.ArgumentParser) -> None:
    """`--token`, on every command that may reach the Hub (as `hf` has it)."""
    p.add_argument("--token", default=None, help="Hub token (default: the logged-in one / HF_TOKEN)")


def format_options(p: argparse.ArgumentParser, *, quiet: str | None = None) -> None:
    """`--format text|json` (json: one document on stdout, nothing else there) and, where useful, `-q`."""
    p.add_argument("--format", choices=["text", "json"], default="text", help="output format (default: text)")
    if quiet:
        p.add_argument("-q", "--quiet", action="store_true", help=quiet)


def emit(args, payload, text: str) -> None:
    """Print `payload` as JSON with --format json, else `text`."""
    if getattr(args, "format", "text") == "json":
        print(json.dumps(payload, indent=2, default=str))
    else:
        print(text)


def organ_from(args, ref: str, revision: str | None = None):
    """Load an organ for a command (folder or repo id), with the command's --token."""
    return OrganModel.from_pretrained(ref, revision=revision, token=getattr(args, "token", None))


def organ_or_set_from(args, ref: str, revision: str | None = None):
    """An organ, or an organ set (`organ_set.json` and one organ per subfolder), by folder or repo id."""
    return _load_organ_or_set(ref, revision, {"token": getattr(args, "token", None)})


def output_folder(path: str | None, what: str = "--out") -> None:
    """Refuse, before any work, an output path that is an existing file (checkpoints are folders)."""
    if path and Path(path).exists() and not Path(path).is_dir():
        raise OutputPathError(f"{what} {path!r} is an existing file; pass a folder path (it is created if needed)")


def load_model(args, name: str, revision: str | None = None, *, with_tokenizer: bool = True):
    """Load a model and tokenizer for a command, saying what was loaded and how long it took (on stderr, so that
    `--format json` output stays one document)."""
    t0 = time.perf_counter()
    model, tokenizer = load_causal_lm(
        name, gguf_file=args.gguf_file, revision=revision, token=getattr(args, "token", None),
        with_tokenizer=with_tokenizer,
    )  # fmt: skip
    print(
        f"loaded {model.name_or_path} ({model.config.model_type}, {model.config.num_hidden_layers} layers) "
        f"in {time.perf_counter() - t0:.1f}s",
        file=sys.stderr if getattr(args, "format", "text") == "json" else sys.stdout,
    )
    return model, tokenizer
