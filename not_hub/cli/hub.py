"""`not-hub push | pull | search`: organs on the Hub."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from ..errors import InvalidArgumentError
from ..hub import list_organs, resolve_checkpoint
from ..modeling_organ import OrganModel
from ..organ_set import OrganSet, is_organ_set
from .common import emit, format_options, positive_int, token_option


def cmd_push(args) -> int:
    """Upload a saved organ (or organ set) folder to a Hub repo in one commit (config.json, model.safetensors,
    README.md; a set: organ_set.json and one organ per subfolder)."""

    if is_organ_set(args.organ):  # a set (e.g. a trained growth set): one commit, organ_set.json and its organs
        unsupported = [f for f in ("commit_description", "tags", "create_pr") if getattr(args, f)]
        if unsupported:
            raise InvalidArgumentError(
                f"{', '.join('--' + f.replace('_', '-') for f in unsupported)} not supported when pushing an organ set "
                f"({args.organ}); push without them"
            )
        url = OrganSet.from_pretrained(args.organ).push_to_hub(
            args.repo_id, revision=args.revision, private=args.private or None, token=args.token,
            commit_message=args.commit_message or "Upload organ set (not_hub)",
        )  # fmt: skip
        print(url)
        return 0
    organ = OrganModel.from_pretrained(args.organ)
    url = organ.push_to_hub(
        args.repo_id,
        revision=args.revision,
        private=args.private or None,
        commit_message=args.commit_message,
        commit_description=args.commit_description,
        token=args.token,
        create_pr=args.create_pr,
        tags=args.tags,
        overwrite_card=args.overwrite_card,
    )
    print(url)
    return 0


def cmd_pull(args) -> int:
    """Download an organ into the Hub cache and verify it; print where it is."""

    organ = OrganModel.from_pretrained(
        args.repo_id, revision=args.revision, cache_dir=args.cache_dir, token=args.token
    )
    folder, _ = resolve_checkpoint(
        args.repo_id, revision=args.revision, cache_dir=args.cache_dir, local_files_only=True, token=args.token
    )
    start, stop = organ.config.layer_range
    if args.quiet:
        print(folder)
        return 0
    payload = {
        "repo_id": args.repo_id,
        "revision": args.revision,
        "folder": str(folder),
        "layer_range": [start, stop],
        "base_model": organ.config.base_model,
        "tensors_verified": len(organ.config.tensor_sha256),
    }
    text = (
        f"{args.repo_id}: layers [{start}, {stop}) of {organ.config.base_model}, "
        f"{len(organ.config.tensor_sha256)} tensors verified\n{folder}"
    )
    emit(args, payload, text)
    return 0


def cmd_search(args) -> int:
    """List organ repos on the Hub, optionally only those cut from one donor."""

    organs = list_organs(args.base_model, author=args.author, search=args.search, limit=args.limit, token=args.token)
    if args.quiet:
        print("\n".join(info.repo_id for info in organs))
    else:
        rows = [f"{info.repo_id}\tbase_model={info.base_model}\t{info.last_modified or ''}" for info in organs]
        emit(args, [dataclasses.asdict(info) for info in organs], "\n".join(rows))
    if not organs:
        print("no organ repos found", file=sys.stderr)
    return 0


def push_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("organ", help="folder of a saved organ or organ set")
    p.add_argument("repo_id", help="target Hub repo, 'namespace/name' (created if needed)")
    p.add_argument("--revision", default=None, help="branch to commit to (created from main if needed)")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--commit-message", default=None, help="commit message")
    p.add_argument("--commit-description", default=None, help="the commit's longer description")
    p.add_argument("--tags", nargs="+", default=None, help="extra tags for the card's metadata")
    p.add_argument(
        "--overwrite-card",
        action="store_true",
        help="replace a hand-written card in the repo (default: merge into it)",
    )
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    token_option(p)


def pull_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("repo_id", help="organ repo, 'namespace/name'")
    p.add_argument("--revision", default=None, help="branch, tag or commit sha of the organ repo")
    p.add_argument("--cache-dir", default=None, help="Hub cache folder (default: the huggingface_hub cache)")
    token_option(p)
    format_options(p, quiet="print only the folder")


def search_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-model", default=None, help="only organs cut from this donor repo id")
    p.add_argument("--author", default=None, help="only repos of this user or organisation")
    p.add_argument("--search", default=None, help="substring of the repo name")
    p.add_argument("--limit", type=positive_int, default=None, help="at most this many results")
    token_option(p)
    format_options(p, quiet="print only the repo ids")
