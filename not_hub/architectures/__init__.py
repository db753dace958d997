"""Where each model family keeps its layer stack, embeddings, final norm, LM head and rotary embedding.

The facts are data: one JSON file per `model_type` under `data/`, validated when this module is imported
(mergekit's `_data/architectures/*.json` is the model). A decoder-only family with no file is discovered at
run time from the model itself (`_no_split_modules` names the decoder-layer class) and flagged as inferred.

The few *conventions* that are code rather than data also live here, so that `model_type ==` appears
nowhere else in the package:

- how a decoder layer is built: `layer_cls(config, layer_idx=i)` (true of every transformers decoder family);
- how its KV-cache slot is named: an integer `layer_idx` attribute on the layer or its attention module;
- which config fields are per-layer lists that must follow a layer when it moves (`per_layer_config`).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
)

from ..errors import UnsafeCheckpointError, UnsupportedArchitectureError

logger = logging.getLogger(__name__)

__all__ = [
    "ArchitectureSpec",
    "SUPPORTED_MODEL_TYPES",
    "decoder_layer_class_path",
    "get_layer_stack",
    "import_decoder_layer_class",
    "renumber_layer_idx",
    "resolve_architecture",
]


@dataclass(frozen=True)
class ArchitectureSpec:
    """Dotted module paths (relative to the `*ForCausalLM` model) of one family's parts.

    Attributes:
        model_type: the transformers `model_type` this spec describes.
        layers: the `nn.ModuleList` of decoder layers.
        embeddings: input-side modules run before the stack (token and position embeddings, embedding norms).
            Entries a given checkpoint does not have (e.g. OPT's optional `project_in`) are skipped.
        final_norm: the norm applied after the last layer.
        lm_head: the output projection.
        rotary_emb: the model-level rotary embedding, if the family computes it once for all layers.
        per_layer_config: config fields that are lists with one entry per layer (e.g. `layer_types`).
        head_extras: modules between the final norm and the LM head (e.g. OPT's `project_out`).
        output_projections: the modules (relative to a layer) that write into the residual stream: with their
            weights and biases zeroed, the layer computes the identity (a growth organ, `not_hub.grow_organ`).
            Parameters whose name starts with one of them are zeroed (a fused MoE expert tensor included).
        identity_requires: config values under which that zeroing is an exact identity (e.g. OPT's pre-norm
            `do_layer_norm_before: true`); other configs are refused.
        inferred: True when the spec was discovered at run time rather than read from a data file.
    """

    model_type: str
    layers: str
    embeddings: tuple[str, ...]
    final_norm: str | None
    lm_head: str
    rotary_emb: str | None = None
    per_layer_config: tuple[str, ...] = ("layer_types",)
    head_extras: tuple[str, ...] = ()
    output_projections: tuple[str, ...] = ()
    identity_requires: dict | None = None
    inferred: bool = False

    @classmethod
    def from_json(cls, data: dict, source: str) -> ArchitectureSpec:
        names = {f.name for f in dataclasses.fields(cls)} - {"inferred"}
        unknown = set(data) - names
        missing = {"model_type", "layers", "embeddings", "final_norm", "lm_head"} - set(data)
        if unknown or missing:
            raise ValueError(f"{source}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
        data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**data)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _load_specs() -> dict[str, ArchitectureSpec]:
    specs = {}
    for entry in sorted(resources.files(__name__).joinpath("data").iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".json"):
            continue
        spec = ArchitectureSpec.from_json(json.loads(entry.read_text()), source=entry.name)
        if entry.name != f"{spec.model_type}.json":
            raise ValueError(f"{entry.name} describes model_type={spec.model_type!r}; rename it")
        specs[spec.model_type] = spec
    return specs


_SPECS: dict[str, ArchitectureSpec] = _load_specs()
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_SPECS))

# Names a family may give its final norm; used only by the discovery fallback.
_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "final_norm", "norm_f")


def _base_model(model: nn.Module) -> nn.Module:
    prefix = getattr(model, "base_model_prefix", "")
    return getattr(model, prefix, model) if prefix else model


def _path_of(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    for name, module in model.named_modules():
        if module is target:
            return name
    return None


def _refuse_non_decoder(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    if config is None or not isinstance(model, PreTrainedModel):
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} is not a transformers PreTrainedModel; load the model with "
            "AutoModelForCausalLM.from_pretrained(...) and pass that"
        )
    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedArchitectureError(
            f"model_type={model_type!r} is an encoder-decoder model; organs can only be taken from and grafted "
            "into decoder-only causal LMs (the NOT paper shows encoder and encoder-decoder transplants fail: the "
            "layers rely on bidirectional context or cross-attention the recipient does not provide)"
        )
    if model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES and model_type not in _SPECS:
        # e.g. BartForCausalLM: the decoder of an encoder-decoder family, run alone (its layers hold cross-attention).
        raise UnsupportedArchitectureError(
            f"model_type={model_type!r} is an encoder-decoder family ({type(model).__name__} is its decoder run "
            "alone, with cross-attention layers); organs can only be taken from and grafted into decoder-only "
            "causal LMs such as llama, qwen2 or gpt2"
        )
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and model_type not in _SPECS:
        raise UnsupportedArchitectureError(
            f"model_type={model_type!r} is an encoder-only (bidirectional) architecture; organs can only be "
            "taken from and grafted into decoder-only causal LMs such as llama, qwen2 or gpt2"
        )
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in _SPECS:
        raise UnsupportedArchitectureError(
            f"model_type={model_type!r} has no causal-LM head in transformers, so it is not a decoder-only "
            "language model; pass a model loaded with AutoModelForCausalLM"
        )


def _discover(model: PreTrainedModel) -> ArchitectureSpec:
    """Infer a spec for a decoder-only family with no data file."""
    model_type = model.config.model_type
    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    n_layers = getattr(model.config, "num_hidden_layers", None)
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and type(module[0]).__name__ in layer_classes
        and (n_layers is None or len(module) == n_layers)
    ]
    if len(candidates) != 1:
        raise UnsupportedArchitectureError(
            f"model_type={model_type!r} has no architecture file and its decoder-layer stack could not be "
            f"discovered (found {len(candidates)} ModuleLists of {sorted(layer_classes)} with "
            f"{n_layers} layers); add not_hub/architectures/data/{model_type}.json"
        )
    layers_path, _ = candidates[0]
    parent_path = layers_path.rpartition(".")[0]
    parent = model.get_submodule(parent_path) if parent_path else model
    final_norm = next(
        (
            f"{parent_path}.{n}".lstrip(".")
            for n in _FINAL_NORM_NAMES
            if isinstance(getattr(parent, n, None), nn.Module)
        ),
        None,
    )
    rotary = next((f"{parent_path}.{n}".lstrip(".") for n, _ in parent.named_children() if "rotary" in n), None)
    embed = _path_of(model, model.get_input_embeddings())
    head = _path_of(model, model.get_output_embeddings())
    if embed is None or head is None:
        raise UnsupportedArchitectureError(
            f"model_type={model_type!r}: could not find the input embeddings or LM head; "
            f"add not_hub/architectures/data/{model_type}.json"
        )
    spec = ArchitectureSpec(
        model_type=model_type,
        layers=layers_path,
        embeddings=(embed,),
        final_norm=final_norm,
        lm_head=head,
        rotary_emb=rotary,
        per_layer_config=("layer_types",),
        inferred=True,
    )
    logger.warning(
        "model_type=%r has no architecture file; using the discovered layout %s (flagged as inferred)",
        model_type,
        spec.to_dict(),
    )
    return spec


def resolve_architecture(model: nn.Module) -> ArchitectureSpec:
    """Return the `ArchitectureSpec` of a causal LM, from its data file or by discovery.

    Raises:
        UnsupportedArchitectureError: the model is encoder-only, encoder-decoder, not a transformers model, or
            its layer stack cannot be found.
    """
    _refuse_non_decoder(model)
    model_type = model.config.model_type
    spec = _SPECS.get(model_type) or _discover(model)
    try:
        stack = model.get_submodule(spec.layers)
    except AttributeError:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no layer stack at {spec.layers!r}; organs are taken from and grafted "
            "into the *ForCausalLM model (AutoModelForCausalLM), not the bare base model"
        ) from None
    if not isinstance(stack, nn.ModuleList):
        raise UnsupportedArchitectureError(f"{spec.layers!r} of {type(model).__name__} is not an nn.ModuleList")
    return spec


def get_layer_stack(model: nn.Module, spec: ArchitectureSpec | None = None) -> nn.ModuleList:
    """The model's `nn.ModuleList` of decoder layers."""
    spec = spec or resolve_architecture(model)
    return model.get_submodule(spec.layers)


def optional_submodule(model: nn.Module, path: str | None) -> nn.Module | None:
    """`model.get_submodule(path)`, or None when the path is None or the checkpoint lacks that (optional) part."""
    if path is None:
        return None
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None
    return module


def decoder_layer_class_path(layer: nn.Module) -> str:
    """`module:QualName` of a decoder layer's class, enough to import it again."""
    cls = type(layer)
    return f"{cls.__module__}:{cls.__qualname__}"


def import_decoder_layer_class(path: str, model_type: str | None) -> type[nn.Module]:
    """The decoder-layer class `path` (`module:QualName`) names, resolved only inside transformers' own model module
    for `model_type`.

    `path` comes from a checkpoint's config, i.e. from whoever wrote the checkpoint (its sha256 checks say nothing
    about trust). Importing an arbitrary module named there would run code of the checkpoint's choosing, so the
    module must be exactly `transformers.models.<family>.modeling_<family>` for the recorded `model_type`, checked
    *before* anything is imported; the object found must be an `nn.Module` class defined in that module.

    Raises:
        UnsafeCheckpointError: the path names any other module, or something that is not a layer class there.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name

    module_name, _, qualname = str(path).partition(":")
    if model_type not in CONFIG_MAPPING_NAMES:
        raise UnsafeCheckpointError(
            f"the organ config records donor model_type={model_type!r}, which transformers does not know; its layer "
            f"class {path!r} cannot be resolved from transformers' own code, and not_hub never imports a module named "
            "by a checkpoint. Upgrade transformers if the family is new, or re-extract the organ"
        )
    family = model_type_to_module_name(model_type)
    expected = f"transformers.models.{family}.modeling_{family}"
    parts = qualname.split(".")
    if module_name != expected or not all(part.isidentifier() and not part.startswith("_") for part in parts):
        raise UnsafeCheckpointError(
            f"the organ config names decoder_layer_class={path!r}; for model_type={model_type!r} only classes of "
            f"{expected} are loaded (a checkpoint never chooses which code runs). Re-extract the organ with "
            "not_hub.extract_organ(model) from a transformers model"
        )
    obj = importlib.import_module(module_name)
    for part in parts:
        obj = getattr(obj, part, None)
    if not (isinstance(obj, type) and issubclass(obj, nn.Module) and obj.__module__ == module_name):
        raise UnsafeCheckpointError(
            f"decoder_layer_class={path!r} is not a layer class defined in {expected}; the organ config is corrupt"
        )
    from transformers import PreTrainedModel

    if issubclass(obj, PreTrainedModel) or not qualname.endswith(("Layer", "Block")):
        # A whole model (LlamaForCausalLM) or a part that is not a decoder layer (LlamaMLP) built per "layer" would
        # allocate a model per layer or fail deep inside with a raw error.
        raise UnsafeCheckpointError(
            f"decoder_layer_class={path!r} is a {'whole model' if issubclass(obj, PreTrainedModel) else 'module'}, "
            f"not a decoder layer of {expected}; the organ config is corrupt (re-extract the organ)"
        )
    return obj


def build_decoder_layer(layer_cls: type[nn.Module], config, layer_idx: int) -> nn.Module:
    """Build one decoder layer with the family's own class (every transformers family takes this signature)."""
    return layer_cls(config, layer_idx=layer_idx)


def _layer_idx_holders(layer: nn.Module) -> Iterator[nn.Module]:
    for module in layer.modules():
        # layer_idx is a plain attribute: read from __dict__ (nn.Module's __getattr__ is slow for missing names)
        if isinstance(module.__dict__.get("layer_idx"), int):
            yield module


def renumber_layer_idx(layers: nn.ModuleList) -> None:
    """Give every layer's `layer_idx` (the KV-cache slot it reads and writes) its index in the stack.

    The cache keys its per-layer entries by `layer_idx`, so after layers are inserted or moved the attribute must
    equal the layer's position or two layers would share a slot.
    """
    for index, layer in enumerate(layers):
        for module in _layer_idx_holders(layer):
            module.layer_idx = index


def point_layer_config(layer: nn.Module, config) -> None:
    """Make a layer's submodules read `config` (the recipient's) at run time, as freshly built layers would.

    Attention modules keep a reference to the config they were built with and read e.g. `_attn_implementation`
    from it in forward; after a transplant they must follow the recipient, exactly as they would after the
    recipient is saved and reloaded.
    """
    for module in layer.modules():
        if hasattr(module, "config") and not isinstance(module, PreTrainedModel):
            module.config = config


def context_length(config) -> int | None:
    """The longest sequence a model's position embeddings allow, if it has a fixed limit (gpt2's `n_positions`).

    Rotary families report `max_position_embeddings` too; going past it degrades them rather than crashing, but it
    is still the documented limit, so it is enforced the same way.
    """
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def parameter_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(module.parameters())
    return param.device, param.dtype


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A new module object sharing every parameter, buffer and child with `module`, but with its own child table."""
    new = copy.copy(module)
    # An instance-level `forward` (accelerate's autocast or device hooks) is bound to the *original* module: copied,
    # the shell would run the original's forward, i.e. the whole donor, and train nothing. The copy uses its class's.
    new.__dict__.pop("forward", None)
    new.__dict__.pop("_original_forward", None)
    new._modules = dict(module._modules)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    return new


def build_shell(model: nn.Module, layers: list[nn.Module], per_layer_values: dict[str, list] | None = None):
    """A causal LM that runs `layers` between `model`'s own embeddings and its final norm + LM head.

    This is the NOT training wrapper, made from the family's own forward (masks, rotary or alibi positions, ...):
    every module on the path from the top model to the layer stack is shallow-copied and the stack is replaced by
    `layers`, so the donor's embeddings, final norm and LM head are *shared*, not copied, and the donor object
    itself is left as it was. The shell has its own config (a copy) with `num_hidden_layers = len(layers)` and the
    given per-layer lists (e.g. the organ's `layer_types`).
    """
    spec = resolve_architecture(model)
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(layers)
    # The layers keep their own `layer_idx` (e.g. donor indices 10..12), which a KV cache of len(layers) slots would
    # not fit; the shell is for training and scoring, which need no cache.
    config.use_cache = False
    for name, values in (per_layer_values or {}).items():
        if values is not None:
            setattr(config, name, list(values))
    if hasattr(config, "transplants"):
        delattr(config, "transplants")
    shell = _shallow_copy(model)
    shell.config = config
    *parents, leaf = spec.layers.split(".")
    parent = shell
    for name in parents:
        child = _shallow_copy(parent._modules[name])
        if isinstance(getattr(child, "config", None), type(config)):
            child.config = config
        parent._modules[name] = child
        parent = child
    parent._modules[leaf] = nn.ModuleList(layers)
    return shell
