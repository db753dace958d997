"""Several organs as one repo: grown or trained together, published together, grafted back in one call.

LLaMA-Pro interleaves new blocks through the whole depth (one after every few layers) and trains them jointly; such
a set only works as a whole. An `OrganSet` is one folder (or Hub repo) holding each organ in its own subfolder
(`organ-0/`, `organ-1/`, ..., each an ordinary organ checkpoint with its sha256 checks) and `organ_set.json`, the
manifest: the organs in graft order, each with the mode and position it was grafted at (positions count the
recipient's layers as they were at that moment, with the earlier organs of the set already in).

    >>> grown = [not_hub.grow_organ(model, position=p) for p in (6, 12, 18, 24)]
    >>> transplants = [o.transplant_into(model, position=p) for o, p in zip(grown, (6, 13, 20, 27))]
    >>> not_hub.recover(model, transplants, blocks, radius=0)  # the new blocks train jointly, the rest frozen
    >>> not_hub.OrganSet.from_transplants(transplants).push_to_hub("me/my-growth-set")
    >>> not_hub.OrganSet.from_pretrained("me/my-growth-set").transplant_into(fresh_model)  # the trained model again
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub.errors import LocalEntryNotFoundError
from torch import nn

from .atomic import replace_folder
from .errors import CheckpointFormatError, InvalidArgumentError, OrganNotFoundError, TransplantStateError
from .hub import check_revision, hub_errors, prepare_repo, repo_file
from .modeling_organ import OrganModel
from .routing import MODES, route
from .transplant import Transplant, transplants_of
from .version import __version__

logger = logging.getLogger(__name__)

SET_FILE = "organ_set.json"
SET_FORMAT = "1.0"
# A manifest is checked whole before any organ is built: a hostile one listing a subfolder thousands of times must
# cost nothing. No decoder has this many layers to graft organs between (the deepest on the Hub have ~200).
MAX_SET_ORGANS = 256
_ENTRY_KEYS = {"subfolder", "mode", "position", "remove"}
_MANIFEST_KEYS = {"format_version", "not_hub_version", "base_model", "organs", "routing"}
_SUBFOLDER = re.compile(r"organ-[0-9]{1,4}")


class OrganSet:
    """Organs grafted in a fixed order at recorded places: saved, pushed and grafted back as one."""

    def __init__(
        self, organs: list[OrganModel], placements: list[dict[str, Any]], *, routing: dict[str, Any] | None = None
    ):
        if not organs or len(organs) != len(placements):
            raise InvalidArgumentError("an OrganSet needs one placement (mode, position) per organ, and an organ")
        self.organs, self.placements = list(organs), [dict(p) for p in placements]
        self.routing = _check_routing(routing)

    @classmethod
    def routed(cls, organs: list[OrganModel], *, mode: str = "token") -> OrganSet:
        """Organs trained apart (e.g. by several teams), grafted together at their default transplants and routed
        (`not_hub.routing`): each gated by its signature. Every organ must be an insert (a growth organ) with a
        routing signature. Positions are adjusted for the organs grafted before each (deepest-first order is not
        needed: an organ's recorded position counts the base model's layers)."""
        placements, shift = [], 0
        order = sorted(
            range(len(organs)), key=lambda i: (organs[i].config.default_transplant or {}).get("position", 0)
        )
        for i in order:
            place = dict(organs[i].config.default_transplant or {})
            if place.get("mode") != "insert":
                raise InvalidArgumentError(
                    f"organ {i} ({organs[i].name_or_path or 'unsaved'}) is not an inserted organ (its default "
                    f"transplant is {place or 'a replace'}); a routed set holds growth organs, which are the identity "
                    "when skipped"
                )
            if organs[i].routing_signature is None:
                raise InvalidArgumentError(
                    f"organ {i} ({organs[i].name_or_path or 'unsaved'}) has no routing signature; compute one with "
                    "not_hub.compute_routing_signature(organ, model, docs, tokenizer=tok)"
                )
            placements.append({"mode": "insert", "position": place["position"] + shift})
            shift += organs[i].config.num_layers
        return cls([organs[i] for i in order], placements, routing={"mode": mode})

    @classmethod
    def from_transplants(cls, transplants: list[Transplant] | nn.Module) -> OrganSet:
        """The live transplants of a model (or a list of them, in the order they were grafted), with their current
        weights (what training made of them).

        Raises:
            InvalidArgumentError: no transplants.
            TransplantStateError: recovery trained neighbouring layers of a transplant (`radius > 0`): a set carries
                organs only, so it would silently lose them.
        """
        if isinstance(transplants, nn.Module):
            transplants = transplants_of(transplants)
        transplants = list(transplants)
        if not transplants:
            raise InvalidArgumentError("no transplants given: graft the organs first, then build the set from them")
        recovered = [i for i, t in enumerate(transplants) if t._neighbour_backup]
        if recovered:  # a set carries organs only: dropping trained neighbours would change the model's output
            raise TransplantStateError(
                f"transplant(s) {recovered} had neighbouring recipient layers trained by recovery (radius > 0); a set "
                "carries only the organs, so it would not reproduce this model. Recover with radius=0 to build a set, "
                "or save each organ with its neighbours: transplant.to_organ().save_pretrained(...)"
            )
        organs = [t.to_organ(neighbours=False) for t in transplants]
        placements = [
            {"mode": t.entry["mode"], "position": t.entry["position"]}
            | ({"remove": t.entry["removed_layers"]} if "removed_layers" in t.entry else {})
            for t in transplants
        ]
        return cls(organs, placements)

    def transplant_into(self, recipient: nn.Module) -> list[Transplant]:
        """Graft every organ, in order, at its recorded place, and route them if the set is routed
        (`not_hub.router_of(recipient)` then has the gates). All or nothing: on an error the organs already grafted
        are explanted again (newest first) and the error is raised."""
        done: list[Transplant] = []
        try:
            for organ, place in zip(self.organs, self.placements, strict=True):
                done.append(organ.transplant_into(recipient, **place))
            if self.routing:
                names = [o.name_or_path or f"organ-{i}" for i, o in enumerate(self.organs)]
                route(recipient, done, mode=self.routing["mode"], names=names)
        except BaseException:
            for transplant in reversed(done):
                transplant.explant()
            raise
        return done

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write `organ_set.json` and one organ checkpoint per subfolder, atomically as a folder."""
        manifest = {
            "format_version": SET_FORMAT,
            "not_hub_version": __version__,
            "base_model": self.organs[0].config.base_model,
            "organs": [{"subfolder": f"organ-{i}", **p} for i, p in enumerate(self.placements)],
        } | ({"routing": self.routing} if self.routing else {})

        def write(folder: Path) -> None:
            for i, organ in enumerate(self.organs):
                organ.save_pretrained(folder / f"organ-{i}")
            (folder / SET_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
            (folder / "README.md").write_text(render_set_card(self))

        replace_folder(save_directory, write)
        return Path(save_directory)

    def push_to_hub(
        self, repo_id: str, *, revision: str | None = None, private: bool | None = None, token=None,
        commit_message: str = "Upload organ set (not_hub)",
    ) -> str:  # fmt: skip
        """Push the set as one commit to a model repo; returns the commit URL."""
        check_revision(revision)
        api = prepare_repo(repo_id, revision=revision, private=private, token=token)
        with tempfile.TemporaryDirectory(prefix="not_hub-set-") as tmp:
            folder = self.save_pretrained(Path(tmp) / "set")
            with hub_errors(f"pushing organ set to {repo_id!r}"):
                info = api.upload_folder(
                    repo_id=repo_id, folder_path=folder, revision=revision, commit_message=commit_message
                )
        return str(info)

    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike, *, revision: str | None = None, token=None, **kwargs: Any
    ) -> OrganSet:
        """Load a set from a folder or a Hub repo id (`revision`, `token`, `cache_dir`, `local_files_only`, `dtype`,
        `device_map` reach every organ's `from_pretrained`). Each organ is checked as any organ is."""
        manifest = _read_manifest(name_or_path, revision, token, kwargs)
        organs = [
            OrganModel.from_pretrained(name_or_path, subfolder=entry["subfolder"], revision=revision, token=token, **kwargs)
            for entry in manifest["organs"]
        ]  # fmt: skip
        placements = [{k: v for k, v in entry.items() if k != "subfolder"} for entry in manifest["organs"]]
        return cls(organs, placements, routing=manifest.get("routing"))

    def __len__(self) -> int:
        return len(self.organs)


def is_organ_set(name_or_path: str | os.PathLike) -> bool:
    """Whether a local folder holds an organ set (Hub repos: `OrganSet.from_pretrained` says so by loading)."""
    return (Path(name_or_path) / SET_FILE).is_file()


def _read_manifest(name_or_path, revision, token, kwargs) -> dict:
    try:
        manifest_path = repo_file(
            name_or_path, SET_FILE, revision=revision, token=token, cache_dir=kwargs.get("cache_dir"),
            local_files_only=kwargs.get("local_files_only", False),
        )  # fmt: skip
    except LocalEntryNotFoundError:  # offline, and not in the cache
        manifest_path = None
    if manifest_path is None:
        raise OrganNotFoundError(
            f"{str(name_or_path)!r} has no {SET_FILE} (at revision {revision or 'main'!r}): not an organ set"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise CheckpointFormatError(f"{manifest_path} is not valid JSON ({err})") from None
    _check_manifest(manifest, manifest_path)
    return manifest


def _check_manifest(manifest: Any, path: Path) -> None:
    """Refuse a manifest that `save_pretrained` would not write, before anything is loaded: a format this version
    cannot read, too many organs, a subfolder listed twice, unknown keys, malformed entries."""
    shape = (
        "an organ-set manifest is a JSON object whose 'organs' is a list of entries {subfolder: organ-N, mode, "
        "position[, remove]}, as OrganSet.save_pretrained writes it"
    )
    if not isinstance(manifest, dict):
        raise CheckpointFormatError(f"{path} is not an organ-set manifest: {shape}")
    version = manifest.get("format_version", SET_FORMAT)
    major = version.split(".")[0] if isinstance(version, str) else None
    if major != SET_FORMAT.split(".")[0]:
        raise CheckpointFormatError(
            f"{path} has format_version={version!r}; this not_hub ({__version__}) reads organ sets of format "
            f"{SET_FORMAT.split('.')[0]}.x: upgrade not_hub (pip install -U not_hub) to load it"
        )
    entries = manifest.get("organs")
    if not isinstance(entries, list) or not entries:
        raise CheckpointFormatError(f"{path} lists no organs: {shape}")
    if len(entries) > MAX_SET_ORGANS:
        raise CheckpointFormatError(
            f"{path} lists {len(entries)} organs; an organ set holds at most {MAX_SET_ORGANS} (it was not written by "
            "OrganSet.save_pretrained, or not for a model anyone can run)"
        )
    seen: set[str] = set()
    for i, e in enumerate(entries):
        valid = (
            isinstance(e, dict)
            and isinstance(e.get("subfolder"), str)
            and _SUBFOLDER.fullmatch(e["subfolder"]) is not None
            and e.get("mode") in ("replace", "insert", "bridge", "splice")
            and isinstance(e.get("position"), int)
            and not isinstance(e.get("position"), bool)
            and 0 <= e["position"] < 100_000
            and (
                "remove" not in e
                or (isinstance(e["remove"], int) and not isinstance(e["remove"], bool) and 0 <= e["remove"] < 100_000)
            )
        )
        if not valid:
            raise CheckpointFormatError(
                f"{path} is not an organ-set manifest: organs[{i}] = {str(e)[:200]} is malformed; {shape}"
            )
        extra = set(e) - _ENTRY_KEYS
        if extra:
            raise CheckpointFormatError(
                f"{path}: organs[{i}] has unknown key(s) {sorted(extra)}; an entry holds only {sorted(_ENTRY_KEYS)}"
            )
        if e["subfolder"] in seen:
            raise CheckpointFormatError(
                f"{path}: subfolder {e['subfolder']!r} is listed twice (organs[{i}]); each organ of a set is grafted "
                "once, from its own subfolder"
            )
        seen.add(e["subfolder"])
    try:
        _check_routing(manifest.get("routing"))
    except InvalidArgumentError as err:
        raise CheckpointFormatError(f"{path}: {err}") from None
    unknown = set(manifest) - _MANIFEST_KEYS
    if unknown:  # forward-compatible at the top level, as configs are: a newer writer may add metadata
        logger.warning("%s: ignoring unknown manifest key(s) %s", path, sorted(unknown))


def _check_routing(routing: Any) -> dict[str, Any] | None:
    if routing is None:
        return None
    if not isinstance(routing, dict) or routing.get("mode") not in MODES or set(routing) - {"mode"}:
        raise InvalidArgumentError(f"routing={routing!r} is not allowed; expected {{'mode': one of {MODES}}} or None")
    return dict(routing)


def render_set_card(organ_set: OrganSet) -> str:
    """The set's README.md: what it holds, where each organ goes, what each was trained on, how it is routed."""
    from huggingface_hub import ModelCard, ModelCardData

    first = organ_set.organs[0].config
    data = ModelCardData(
        base_model=first.base_model or None, library_name="not_hub", tags=["not_hub", "organ-set", "organ"]
    )
    routing = organ_set.routing
    lines = [
        f"# Organ set: {len(organ_set)} organs for {first.base_model or 'its base model'}",
        "",
        "Several organs ([not_hub](https://github.com/not-hub/not_hub)) in one repo, grafted together in one call:",
        "",
        "```python",
        "import not_hub",
        'model, tokenizer = not_hub.load_grafted("<this repo id>")',
        "```",
        "",
        (
            f"**Routed** ({routing['mode']} mode): each organ is switched on only for text that matches its signature "
            "(statistics of the hidden states it was trained on), decided from the tokens before the one predicted; "
            "switched off, an organ is skipped exactly. `not_hub.router_of(model).decisions` shows the gates."
            if routing
            else "Not routed: every organ runs on every token."
        ),
        "",
        "| subfolder | source | mode, position | layers | trained on | signature (tokens, threshold) |",
        "|---|---|---|---|---|---|",
    ]
    for i, (organ, place) in enumerate(zip(organ_set.organs, organ_set.placements, strict=True)):
        c = organ.config
        data_desc = ((c.training or {}).get("data") or {}).get("domain") or ((c.training or {}).get("data") or {}).get(
            "sources"
        )
        sig = c.routing_signature
        lines.append(
            f"| organ-{i} | {organ.name_or_path or '-'} | {place['mode']}, {place['position']} | {c.num_layers} "
            f"(copies of {list(c.layer_range)}) | {data_desc or '-'} | "
            + (f"{sig['tokens']:,} tokens, {sig['threshold']:.3g}" if sig else "none")
            + " |"
        )
    return ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n" + "\n".join(lines) + "\n").content
