"""A grafted model as one GGUF file (llama.cpp, ollama, LM Studio), converted by llama.cpp's own converter.

not_hub does not write a converter: `export_gguf` saves the grafted model as the plain transformers checkpoint it is
(organs and all, `num_hidden_layers` counting them) with its tokenizer and chat template, and runs llama.cpp's
`convert_hf_to_gguf.py` on it, in a subprocess, with not_hub's description of the organs as GGUF metadata
(`general.description`, `general.tags`, `general.base_model.*`). Output types are the converter's: "f32", "f16",
"bf16", "q8_0".

The converter is not on PyPI as a package of its own; it ships in llama.cpp's sources, which the
`llama-cpp-python` source distribution vendors. `fetch_converter()` downloads that distribution once (pip, 76 MB),
keeps only `convert_hf_to_gguf.py`, `conversion/` and `gguf-py/` (about 3 MB) under the not_hub cache, and reuses them
after; `NOT_HUB_LLAMA_CPP=/path/to/llama.cpp` points at a checkout instead. Nothing is built: converting needs only
Python (torch, numpy, the `gguf` package).

Bridge transplants are refused (as by `save_pretrained`): llama.cpp has no bridge layers.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from .errors import ExportError, InvalidArgumentError, TransplantStateError
from .hub import hub_errors, prepare_repo
from .loading import cache_root
from .plan import get_mode
from .transplant import transplants_of

logger = logging.getLogger(__name__)

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # whose vendored llama.cpp converter `fetch_converter` takes
ENV = "NOT_HUB_LLAMA_CPP"
_KEEP = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")


def _cache_root() -> Path:
    return cache_root() / "llama.cpp"


def converter_path() -> Path | None:
    """llama.cpp's `convert_hf_to_gguf.py`: from `$NOT_HUB_LLAMA_CPP`, else from the cache `fetch_converter` fills."""
    if os.environ.get(ENV):
        script = Path(os.environ[ENV]) / "convert_hf_to_gguf.py"
        return script if script.is_file() else None
    script = _cache_root() / LLAMA_CPP_PYTHON_VERSION / "convert_hf_to_gguf.py"
    return script if script.is_file() else None


def fetch_converter(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """Download llama.cpp's converter once (from the `llama-cpp-python` source distribution on PyPI) into the cache;
    return the path of `convert_hf_to_gguf.py`. Already cached: returns at once."""
    target = _cache_root() / version
    script = target / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    with tempfile.TemporaryDirectory(prefix="not_hub-llama-cpp-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", tmp]
        out = subprocess.run([*cmd, f"llama-cpp-python=={version}"], capture_output=True, text=True)
        archives = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if out.returncode != 0 or not archives:
            raise ExportError(
                f"could not download llama.cpp's converter (llama-cpp-python=={version} from PyPI): "
                f"{(out.stderr or out.stdout).strip().splitlines()[-1:]}; or point {ENV} at a llama.cpp checkout"
            )
        staging = Path(tmp) / "staging"
        with tarfile.open(archives[0]) as archive:
            prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
            members = [
                m
                for m in archive.getmembers()
                if m.name.startswith(prefix) and m.name[len(prefix) :].startswith(_KEEP) and (m.isfile() or m.isdir())
            ]
            for m in members:
                m.name = m.name[len(prefix) :]
            archive.extractall(staging, members=members, filter="data")  # the data filter: no links out, no devices
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{version}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.move(str(staging), partial)
        os.replace(partial, target)  # whole or absent: a killed fetch leaves only the .partial folder
    return script


def _organs_metadata(model: nn.Module) -> dict[str, Any]:
    entries = list(getattr(model.config, "transplants", None) or [])
    organs = [e.get("organ") or "(unsaved organ)" for e in entries]
    base = getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "") or "the base model"
    where = "; ".join(f"{e.get('organ') or 'organ'} ({e.get('mode')} at layer {e.get('position')})" for e in entries)
    description = (
        f"{base} with {len(entries)} organ(s) grafted by not_hub: {where}." if entries else f"{base} (no organ)."
    )
    meta: dict[str, Any] = {
        "general.description": description,
        "general.tags": ["not_hub", "organ", "gguf", *organs],
    }
    if base and "/" in base and not base.startswith(("/", ".")):
        meta["general.base_model.count"] = 1
        meta["general.base_model.0.name"] = base.split("/")[-1]
        meta["general.base_model.0.repo_url"] = f"https://huggingface.co/{base}"
    return meta


def export_gguf(
    model: nn.Module,
    tokenizer,
    path: str | os.PathLike,
    *,
    outtype: str = "f16",
    converter: str | os.PathLike | None = None,
    timeout: float = 1800,
) -> Path:
    """Write `model` (with whatever organs are grafted) and `tokenizer` as one GGUF file at `path`.

    Args:
        model: a transformers causal LM, organs grafted or not (replace, insert, splice, growth sets, recovered).
        tokenizer: its tokenizer (carried over with its chat template).
        path: the `.gguf` file to write (written whole or not at all).
        outtype: "f32", "f16", "bf16" or "q8_0" (llama.cpp's own quantisation of the converter).
        converter: llama.cpp's `convert_hf_to_gguf.py` (default: `converter_path()`, fetched if missing).

    Returns:
        The path written.

    Raises:
        TransplantStateError: a bridge transplant (llama.cpp has no bridge layers).
        InvalidArgumentError: an unknown `outtype`, or `path` is a folder.
        ExportError: llama.cpp's converter failed (its last lines are in the message) or could not be fetched.

    Example:
        ```python
        >>> model, tokenizer = not_hub.load_grafted("me/my-organ")
        >>> not_hub.export_gguf(model, tokenizer, "my-model-q8_0.gguf", outtype="q8_0")
        ```
    """
    if outtype not in OUTTYPES:
        raise InvalidArgumentError(f"outtype={outtype!r} is not allowed; expected one of {OUTTYPES}")
    path = Path(path)
    if path.is_dir():
        raise InvalidArgumentError(f"path {str(path)!r} is a folder; pass the .gguf file to write")
    bridged = [t for t in transplants_of(model) if get_mode(t.mode).bridges]
    if bridged:
        raise TransplantStateError(
            f"{len(bridged)} organ(s) are grafted with bridges, which llama.cpp cannot run (a GGUF has no bridge "
            "layers); export the model before the bridge transplant, or graft the organ with mode='insert'"
        )
    script = Path(converter) if converter else (converter_path() or fetch_converter())
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="not_hub-gguf-", dir=path.parent) as tmp:
        folder = Path(tmp) / "model"
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        (Path(tmp) / "metadata.json").write_text(json.dumps(_organs_metadata(model)))
        partial = Path(tmp) / "out.gguf"
        cmd = [sys.executable, str(script), str(folder), "--outfile", str(partial), "--outtype", outtype]
        cmd += ["--metadata", str(Path(tmp) / "metadata.json")]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            raise ExportError(f"llama.cpp's converter did not finish within {timeout:.0f} s") from None
        if out.returncode != 0 or not partial.is_file():
            tail = "\n".join((out.stderr or out.stdout).strip().splitlines()[-6:])
            raise ExportError(f"llama.cpp's converter ({script}) failed on this model:\n{tail}")
        os.replace(partial, path)
    logger.info("wrote %s (%s, %.1f MB)", path, outtype, path.stat().st_size / 2**20)
    return path


def push_gguf(path: str | os.PathLike, repo_id: str, *, base_model: str | None = None, organs: list[str] | None = None,
              token=None, private: bool | None = None) -> str:  # fmt: skip
    """Upload a GGUF file to a model repo with a card naming the base model and the organs it carries (Hub tag
    `gguf`, so the Hub shows it to llama.cpp / ollama / LM Studio users); returns the commit URL."""
    from huggingface_hub import CommitOperationAdd, ModelCard, ModelCardData

    path = Path(path)
    if not path.is_file():
        raise InvalidArgumentError(f"{str(path)!r} is not a file; export it first (not_hub.export_gguf)")
    api = prepare_repo(repo_id, revision=None, private=private, token=token)
    data = ModelCardData(base_model=base_model or None, library_name="gguf", tags=["gguf", "not_hub", "organ"])
    body = [
        f"# {path.stem}",
        "",
        f"A GGUF of {base_model or 'a base model'} with organs grafted by not_hub, for llama.cpp, ollama and LM "
        "Studio: `llama-cli -m " + path.name + "`.",
        "",
        "Organs it carries: " + (", ".join(organs) if organs else "none recorded") + ".",
    ]
    card = ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n" + "\n".join(body) + "\n")
    ops = [
        CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=str(path)),
        CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.content.encode()),
    ]
    with hub_errors(f"pushing {path.name} to {repo_id!r}"):
        info = api.create_commit(repo_id=repo_id, operations=ops, commit_message=f"Upload {path.name} (not_hub)")
    return str(info)
