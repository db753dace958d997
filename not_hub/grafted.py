"""One call from an organ repo id to a grafted model: what `AutoPeftModelForCausalLM.from_pretrained` is for peft.

`load_grafted("user/organ")` loads the organ, reads which model it belongs to (`base_model` at
`base_model_revision`), loads that model and its tokenizer, and grafts the organ at its default transplant. The
result is an ordinary transformers model: `generate()` and `transformers.pipeline("text-generation", ...)` work, and
`not_hub.transplants_of(model)[0].explant()` still takes the organ out.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import HubRequestError, InvalidArgumentError, ModelLoadError, OrganNotFoundError
from .modeling_organ import OrganModel
from .organ_set import OrganSet, is_organ_set
from .routing import MODES, route
from .transplant import Transplant


def load_grafted(
    organs: str | os.PathLike | list[str | os.PathLike],
    *,
    recipient: str | os.PathLike | None = None,
    revision: str | None = None,
    recipient_revision: str | None = None,
    dtype: Any = None,
    device_map: Any = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    routing: str | None = None,
):
    """Load the model an organ belongs to, with the organ grafted in, and its tokenizer.

    Args:
        organs: an organ repo id or folder, or a list of them (each at its default transplant, the deepest first, so
            that every position counts the base model's layers); an organ set (`not_hub.OrganSet`: several organs in one repo) is grafted whole, at its recorded places.
        recipient: the model to graft into (Hub id or folder); default: the first organ's `base_model`.
        revision: the organ repo's revision (branch, tag or commit sha), for every organ given.
        recipient_revision: the recipient's revision; default: the organ's `base_model_revision` when the
            recipient is its `base_model`.
        dtype, device_map: as `AutoModelForCausalLM.from_pretrained` (the organ follows the layers it joins).
        token, cache_dir, local_files_only: passed to both downloads, organ and recipient.
        routing: "token" or "sequence" to gate every grafted organ by its routing signature (`not_hub.routing`:
            inserted organs with signatures, e.g. growth organs from several teams); a routed set is routed as it
            was saved without it. `not_hub.router_of(model)` has the gates.

    Returns:
        `(model, tokenizer)`: a transformers causal LM with the organ(s) grafted (`model.config.transplants` says
        which, where) and the recipient's tokenizer.

    Raises:
        InvalidArgumentError: no organ given, or no recipient named and the organ records no `base_model`.
        OrganNotFoundError, ModelLoadError, IncompatibleOrganError, ...: from loading and grafting; a model that
            failed to graft is not returned.

    Example:
        ```python
        >>> model, tokenizer = not_hub.load_grafted("me/my-organ")
        >>> transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)("def add(a, b):")
        ```
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    refs = list(organs) if isinstance(organs, (list, tuple)) else [organs]
    if not refs:
        raise InvalidArgumentError("load_grafted() needs at least one organ repo id or folder")
    hub = dict(token=token, cache_dir=cache_dir, local_files_only=local_files_only)
    loaded = [_load_organ_or_set(ref, revision, hub) for ref in refs]
    first = loaded[0].organs[0] if isinstance(loaded[0], OrganSet) else loaded[0]
    base = first.config.base_model
    name = str(recipient) if recipient is not None else base
    if not name:
        raise InvalidArgumentError(
            f"organ {refs[0]!s} records no base_model, so the model to graft it into is unknown; pass recipient="
        )
    if recipient is None and not Path(str(refs[0])).is_dir() and _looks_local(base):
        # An organ pulled from the Hub names where its recipient lives; a local path there would make loading read
        # whatever this machine has at that path. Only the user names local folders.
        raise InvalidArgumentError(
            f"organ {refs[0]!s} comes from the Hub but its base_model is a local path ({base!r}), which is not loaded "
            "without asking; pass recipient= the model to graft it into (a Hub id or a folder of yours)"
        )
    if recipient_revision is None and name == base:
        recipient_revision = first.config.base_model_revision
    if (Path(name) / "config.json").is_file() and _is_organ_folder(Path(name)):
        raise InvalidArgumentError(
            f"recipient {name!r} is an organ folder, not a model; pass recipient= the base model to graft into "
            f"(this organ's base_model: {base or 'not recorded'})"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, revision=recipient_revision, dtype=dtype, device_map=device_map, **hub
        )
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"could not load {name!r}, the model organ {refs[0]!s} belongs to ({str(err).splitlines()[0][:200]}); "
            "pass recipient= a local folder or a reachable Hub id of the same architecture"
        ) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=recipient_revision, **hub)
    except (OSError, ValueError, TypeError) as err:
        raise ModelLoadError(
            f"{name!r} has no usable tokenizer ({str(err).splitlines()[0][:200]}); load_grafted returns the model "
            "with its tokenizer: save the tokenizer beside the model (tokenizer.save_pretrained(folder)), or graft "
            "with OrganModel.from_pretrained(...).transplant_into(model)"
        ) from None
    if routing is not None:
        if routing not in MODES:
            raise InvalidArgumentError(f"routing={routing!r} is not a routing mode; expected one of {MODES} or None")
    graft_organs(model, loaded, routing=routing)
    return model.eval(), tokenizer


def graft_organs(model, organs: list[OrganModel | OrganSet], *, routing: str | None = None) -> list[Transplant]:
    """Graft organs (each at its default transplant) and organ sets (at their recorded places) into `model`, and
    route them all if `routing` names a mode. All or nothing: on an error every graft made here is taken out again.

    Several plain organs are grafted deepest first: each one's default position counts the base model's layers, so
    an inserted organ never shifts the slot of one still to come."""
    loaded = list(organs)
    if len(loaded) > 1 and all(isinstance(o, OrganModel) for o in loaded):
        loaded.sort(key=lambda o: -(o.config.default_transplant or {}).get("position", o.layer_range[0]))
    grafted: list[Transplant] = []
    try:
        for organ in loaded:
            if isinstance(organ, OrganSet) and routing is not None:
                organ.routing = None  # routed below, together with the other organs
            done = organ.transplant_into(model)
            grafted += done if isinstance(done, list) else [done]
        if routing is not None:
            names = [t.entry.get("organ") or f"organ-{i}" for i, t in enumerate(grafted)]
            route(model, grafted, mode=routing, names=names)
    except BaseException:
        for t in reversed(grafted):
            if t.active:
                t.explant()
        raise
    return grafted


def _load_organ_or_set(ref, revision, hub) -> OrganModel | OrganSet:
    """An organ, or an organ set (`organ_set.json` and one organ per subfolder), by folder or repo id."""
    if is_organ_set(ref):
        return OrganSet.from_pretrained(ref, revision=revision, **hub)
    try:
        return OrganModel.from_pretrained(ref, revision=revision, **hub)
    except OrganNotFoundError as err:
        try:  # a Hub repo holding a set has no organ at its root
            return OrganSet.from_pretrained(ref, revision=revision, **hub)
        except (OrganNotFoundError, HubRequestError):  # (a missing revision: the organ's own message says it)
            raise err from None


def _looks_local(base: str | None) -> bool:
    """Whether a recorded base_model is a filesystem path rather than a Hub repo id ("namespace/name" or "name")."""
    if not base:
        return False
    return base.startswith(("/", ".", "~")) or "\\" in base or ":" in base or base.count("/") > 1


def _is_organ_folder(folder: Path) -> bool:
    """Whether a folder holds an organ (its config.json is an OrganConfig) or an organ set."""
    if (folder / "organ_set.json").is_file():
        return True
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and ("layer_range" in config and "donor_model_type" in config)
