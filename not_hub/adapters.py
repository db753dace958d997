"""peft adapters on transplanted models: the adapter records the transplant it was trained on, and is refused by a
model that does not carry it.

peft records `base_model_name_or_path` from the model's `name_or_path`, which a transplant does not change (the
recipient is still the model it was loaded from), and `PeftModel.from_pretrained` loads an adapter trained on an
8-layer transplanted model into the 6-layer untouched one without a word (the keys of the extra layers are dropped,
the others land on shifted layers). `save_adapter` / `push_adapter` write the transplant next to the adapter
(`not_hub_transplant.json`, a tag and a section in the card); `load_adapter` compares it with the model it is
given and raises `IncompatibleAdapterError`, naming the missing organ and the line that grafts it, before peft
touches the model.

Example:
    ```python
    >>> with organ.transplanted(recipient):
    ...     peft_model = get_peft_model(recipient, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    ...     ...  # train
    ...     not_hub.push_adapter(peft_model, "me/adapter-on-transplant")
    >>> model = not_hub.load_adapter(fresh_recipient, "me/adapter-on-transplant")  # IncompatibleAdapterError
    >>> organ.transplant_into(fresh_recipient)
    >>> model = not_hub.load_adapter(fresh_recipient, "me/adapter-on-transplant")  # a PeftModel
    ```
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard
from safetensors import safe_open
from torch import nn

from .architectures import resolve_architecture
from .atomic import replace_folder
from .bridges import unwrap
from .cards import LIBRARY_TAG
from .errors import AdapterNotFoundError, CheckpointFormatError, IncompatibleAdapterError, InvalidArgumentError
from .hub import hub_errors, prepare_repo, remote_card, repo_file
from .integrity import tensor_sha256
from .transplant import transplants_of
from .version import __version__

logger = logging.getLogger(__name__)

RECORD_FILE = "not_hub_transplant.json"
TRANSPLANT_TAG = "not_hub-transplant"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# What makes two transplants the same for an adapter: the same organ weights in the same place.
_COMPARED = ("organ", "organ_revision", "donor_layer_range", "position", "mode", "num_layers", "removed_layers")


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _weights_sha256(layers) -> str:
    """sha256 of a block of layers' weights (as float32, so a later cast does not count as other weights)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(nn.ModuleList(layers).state_dict().items()):
        if "lora_" in name or "modules_to_save" in name:  # peft's own weights, injected into the layers
            continue
        name = name.replace(".base_layer.", ".")  # a layer peft wrapped is the same layer
        digest.update(name.encode())
        digest.update(tensor_sha256(tensor.detach().float()).encode())
    return digest.hexdigest()


def transplant_record(model: nn.Module) -> dict[str, Any]:
    """What an adapter trained on `model` (a `PeftModel` or the transformers model) needs: the recipient, its depth
    and the live transplants (`config.transplants`, in order), each with the sha256 of the organ layers' weights
    as they are in the model (two organs under one repo id and revision but with other weights are told apart)."""
    base = _base(model)
    transplants = getattr(base.config, "transplants", [])
    live = {id(t.entry): t for t in transplants_of(base)}
    entries = []
    for entry in transplants:
        record = json.loads(json.dumps(entry, default=str))
        if id(entry) in live and live[id(entry)].layers:
            record["weights_sha256"] = _weights_sha256(unwrap(layer) for layer in live[id(entry)].layers)
        entries.append(record)
    return {
        "recipient": getattr(base, "name_or_path", None) or None,
        "num_hidden_layers": base.config.num_hidden_layers,
        "transplants": entries,
        "not_hub_version": __version__,
    }


def _read_record(path: Path, adapter) -> dict:
    """The adapter's transplant record, checked for the shape `check_adapter` relies on."""
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise CheckpointFormatError(f"{path} (adapter {str(adapter)!r}) is not valid JSON ({err})") from None

    def entry_ok(e) -> bool:
        return isinstance(e, dict) and isinstance(e.get("mode"), str) and isinstance(e.get("position"), int)

    if not (
        isinstance(record, dict)
        and isinstance(record.get("num_hidden_layers"), int)
        and isinstance(record.get("transplants"), list)
        and all(map(entry_ok, record["transplants"]))
    ):
        raise CheckpointFormatError(
            f"{path} (adapter {str(adapter)!r}) is not a transplant record (an object with num_hidden_layers and a "
            "list of transplants, as not_hub.save_adapter writes it); re-save the adapter with not_hub.save_adapter"
        )
    return record


def _describe(record: dict) -> str:
    parts = [
        f"organ {e.get('organ') or '(unsaved)'!r} ({e['mode']} at position {e['position']})"
        for e in record["transplants"]
    ]
    return (" + ".join(parts) or "no transplant") + f", {record['num_hidden_layers']} layers"


def _graft_line(entry: dict) -> str:
    """The line that grafts a recorded transplant's organ back into `model`."""
    return (
        f"not_hub.OrganModel.from_pretrained({entry.get('organ')!r}).transplant_into(model, "
        f"position={entry['position']}, mode={entry['mode']!r})"
    )


def _card_section(record: dict) -> str:
    lines = ["## Transplant", "", "This adapter was trained on a model carrying organs grafted with not_hub:", ""]
    for e in record["transplants"]:
        lines.append(f"- `{e.get('organ') or '(unsaved)'}` ({e['mode']} at position {e['position']})")
    lines += [
        "",
        f"Load it onto `{record['recipient']}` with the same organs, in the same order:",
        "",
        "```python",
        "import not_hub",
        "from transformers import AutoModelForCausalLM",
        f"model = AutoModelForCausalLM.from_pretrained({record['recipient']!r})",
    ]
    lines += [_graft_line(e) for e in record["transplants"]]
    lines += ["model = not_hub.load_adapter(model, 'this/repo')", "```", ""]
    return "\n".join(lines)


def _write_adapter(peft_model, folder: Path, kwargs: dict) -> None:
    card_path = folder / "README.md"
    # peft merges its metadata into a card already in the folder but replaces its tags: keep the user's
    own_tags = list(ModelCard(card_path.read_text()).data.tags or []) if card_path.is_file() else []
    peft_model.save_pretrained(folder, **kwargs)
    record = transplant_record(peft_model)
    (folder / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    card = ModelCard(card_path.read_text()) if card_path.is_file() else ModelCard("---\n---\n")
    if own_tags:
        card.data.tags = [*own_tags, *(t for t in card.data.tags or [] if t not in own_tags)]
    if record["transplants"]:
        card.data.tags = sorted({*(card.data.tags or []), LIBRARY_TAG, TRANSPLANT_TAG})
        if "## Transplant" not in card.text:
            card.text = card.text.rstrip() + "\n\n" + _card_section(record)
    card.save(card_path)


def _check_peft_model(peft_model) -> None:
    from peft import PeftModel

    if not isinstance(peft_model, PeftModel):
        raise InvalidArgumentError(
            f"save_adapter/push_adapter take a peft PeftModel (from get_peft_model), not {type(peft_model).__name__}"
        )


def save_adapter(peft_model, save_directory: str | os.PathLike, **kwargs: Any) -> Path:
    """`peft_model.save_pretrained(save_directory, **kwargs)` plus the transplant record and card section.

    The folder is replaced in one step (a failure leaves the previous adapter); files already there that peft does
    not write (a hand-written README is merged, not replaced) are kept.
    """
    _check_peft_model(peft_model)
    target = Path(save_directory)
    existing = target / "README.md"
    card = existing.read_text(encoding="utf-8") if existing.is_file() else None
    if card is not None:
        _check_card_yaml(card, existing)

    def write(folder: Path) -> None:
        if card is not None:  # peft and not_hub merge into the user's card, as push_adapter does on the Hub
            (folder / "README.md").write_text(card, encoding="utf-8")
        _write_adapter(peft_model, folder, kwargs)

    replace_folder(target, write)
    return target


def push_adapter(
    peft_model,
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str = "Upload adapter trained on a transplanted model (not_hub)",
    **kwargs: Any,
) -> str:
    """Push the adapter, its transplant record and its card to a Hub model repo; an existing card is merged."""
    _check_peft_model(peft_model)
    api = prepare_repo(repo_id, revision=revision, private=private, token=token)
    existing = remote_card(api, repo_id, revision)
    with tempfile.TemporaryDirectory(prefix="not_hub-adapter-") as tmp:
        folder = Path(tmp) / "adapter"
        folder.mkdir()
        if existing is not None:
            (folder / "README.md").write_text(existing)  # peft and not_hub merge into it
        _write_adapter(peft_model, folder, kwargs)
        with hub_errors(f"pushing the adapter to {repo_id!r}"):
            info = api.upload_folder(
                repo_id=repo_id, folder_path=folder, revision=revision, commit_message=commit_message
            )
    return str(info)


def _adapter_file(adapter: str | os.PathLike, name: str, revision: str | None, token) -> Path | None:
    text = str(adapter)
    looks_local = isinstance(adapter, os.PathLike) or text.startswith(("/", ".", "~")) or text.count("/") > 1
    if looks_local and not Path(text).expanduser().is_dir():
        raise AdapterNotFoundError(
            f"adapter folder {text!r} does not exist; pass the folder save_adapter wrote, or a Hub repo id "
            "'namespace/name'"
        )
    return repo_file(adapter, name, revision=revision, token=token)


def _check_card_yaml(card: str, where: Path) -> None:
    """Refuse, before anything is written, a card whose YAML header cannot be read (peft would fail half-way)."""
    try:
        ModelCard(card)
    except Exception as err:  # yaml raises its own parser/scanner errors
        raise CheckpointFormatError(
            f"{where} has a YAML header that cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:120]}); "
            "fix or remove the header (between the first two '---' lines), then save again. Nothing was written"
        ) from None


def _same_transplant(a: dict, b: dict) -> bool:
    """The same organ weights in the same place (weights compared when both records carry their sha256)."""
    keys = _COMPARED + (("weights_sha256",) if a.get("weights_sha256") and b.get("weights_sha256") else ())
    return all(a.get(k) == b.get(k) for k in keys)


def check_adapter(
    model: nn.Module, adapter: str | os.PathLike, *, revision: str | None = None, token: str | bool | None = None
) -> dict | None:
    """Raise `IncompatibleAdapterError` if the adapter was trained on another transplant state than `model`'s.

    An adapter saved by `save_adapter`/`push_adapter` carries its record (returned); the model must have the same
    transplants (organ, revision, position, mode) and depth. A plain peft adapter (no record) is checked by its
    weights: it must not hold layers the model does not have.
    """
    base = _base(model)
    mine = transplant_record(base)
    record_path = _adapter_file(adapter, RECORD_FILE, revision, token)
    weights = _adapter_file(adapter, ADAPTER_WEIGHTS, revision, token)
    indices = set()
    if weights is not None:
        pattern = re.compile(re.escape(resolve_architecture(base).layers) + r"\.(\d+)\.")
        with safe_open(str(weights), framework="pt") as f:
            indices = {int(m.group(1)) for key in f.keys() if (m := pattern.search(key))}
    if record_path is not None:
        record = _read_record(record_path, adapter)
        if indices and max(indices) >= record["num_hidden_layers"]:
            raise IncompatibleAdapterError(
                f"adapter {str(adapter)!r} is inconsistent: its record says {record['num_hidden_layers']} layers but "
                f"its weights reach layer {max(indices)}; the record was edited or belongs to another adapter"
            )

        wanted, have = record["transplants"], mine["transplants"]
        same = len(wanted) == len(have) and all(map(_same_transplant, wanted, have))
        if not same or record["num_hidden_layers"] != mine["num_hidden_layers"]:
            if record["transplants"]:
                grafts = "; ".join(_graft_line(e) for e in record["transplants"])
                fix = f"Graft the same organs first ({grafts}), then load the adapter"
            else:
                fix = "Load it onto the untouched model (explant first)"
            raise IncompatibleAdapterError(
                f"adapter {str(adapter)!r} was trained on {record.get('recipient')!r} with {_describe(record)}; this "
                f"model has {_describe(mine)}. {fix}"
            )
        return record
    if indices:
        if max(indices) >= mine["num_hidden_layers"]:
            raise IncompatibleAdapterError(
                f"adapter {str(adapter)!r} has weights for layer {max(indices)}, this model has "
                f"{mine['num_hidden_layers']} layers ({_describe(mine)}): it was trained on a deeper model, e.g. one "
                "carrying an inserted organ, and records no transplant. Load it onto the model it was trained on"
            )
        config_path = _adapter_file(adapter, "adapter_config.json", revision, token)
        try:
            chosen = json.loads(config_path.read_text()).get("layers_to_transform") if config_path else None
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            chosen = None
        if chosen is None and max(indices) + 1 < mine["num_hidden_layers"]:
            logger.warning(
                "adapter %r has weights for layers up to %d only, and this model has %d layers: it was probably "
                "trained on a shallower model (e.g. one with layers excised), and records no transplant; its "
                "weights would land on the first %d layers of this one",
                str(adapter), max(indices), mine["num_hidden_layers"], max(indices) + 1,
            )  # fmt: skip
    if mine["transplants"]:
        logger.warning(
            "adapter %r records no transplant, and this model carries %s: if the adapter was trained on the "
            "untouched model, its weights for layers at or after the organ land on other layers",
            str(adapter),
            _describe(mine),
        )
    return None


def load_adapter(
    model: nn.Module,
    adapter: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    **kwargs: Any,
):
    """`PeftModel.from_pretrained(model, adapter, ...)` after `check_adapter`: nothing is wrapped on a mismatch."""
    from peft import PeftModel

    check_adapter(model, adapter, revision=revision, token=token)
    extra = {"revision": revision} if revision is not None else {}
    if token is not None:
        extra["token"] = token
    return PeftModel.from_pretrained(model, str(adapter), **extra, **kwargs)
