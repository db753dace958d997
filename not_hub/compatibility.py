"""Structural signatures and the compatibility report between an organ and a recipient.

The signature is what a decoder layer's weights and computation depend on. It is read from the config (through
each field's candidate names, since families spell them differently) and from a layer module (norm class,
decoder-layer class, parameter shapes). Any other config field that differs between donor and recipient and is
not known to be layer-independent (vocabulary, depth, token ids, ...) is reported too and blocks: after a
transplant the recipient's config is what rebuilds the organ's layers when the recipient is saved and reloaded,
so every layer-relevant field must agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn
from transformers import PreTrainedConfig

from .architectures import decoder_layer_class_path

# signature field -> config attribute names that families use for it, first match wins.
_CONFIG_FIELDS: dict[str, tuple[str, ...]] = {
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_attention_heads": ("num_attention_heads", "n_head"),
    "num_key_value_heads": ("num_key_value_heads", "num_kv_heads"),
    "head_dim": ("head_dim",),
    "intermediate_size": ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size"),
    "norm_eps": ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps"),
    "activation": ("hidden_act", "hidden_activation", "activation_function"),
    "rotary": ("rope_parameters", "rope_scaling", "rotary_dim", "rotary_pct", "partial_rotary_factor"),
    "attention_bias": ("attention_bias", "bias", "enable_bias", "qkv_bias", "use_bias"),
}

# Config keys that do not shape a decoder layer: they never block (listed as information only when they differ).
_LAYER_INDEPENDENT = {
    "vocab_size",
    "num_hidden_layers",
    "n_layer",
    "num_layers",
    "layer_types",
    "max_position_embeddings",
    "n_positions",
    "n_ctx",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "unk_token_id",
    "sep_token_id",
    "tie_word_embeddings",
    "use_cache",
    "initializer_range",
    "init_std",
    "transplants",
    "architectures",
    "_name_or_path",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "model_type",
    "quantization_config",
    "id2label",
    "label2id",
    "output_hidden_states",
    "return_dict",
    "chunk_size_feed_forward",
    "problem_type",
    "is_encoder_decoder",
    "output_attentions",
    "tokenizer_class",
    "task_specific_params",
    "word_embed_proj_dim",
    "embd_pdrop",
    "use_embedding_sharing",
    "scale_embedding",
    "do_layer_norm_before",
    "final_logit_softcapping",
    "max_window_layers",
    "use_sliding_window",
    "num_labels",
    "summary_type",
    "summary_use_proj",
    "summary_activation",
    "summary_proj_to_labels",
    "summary_first_dropout",
    "pretraining_tp",
}


def _first_attr(config: PreTrainedConfig, names: tuple[str, ...]) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def structural_signature(config: PreTrainedConfig, layer: nn.Module) -> dict[str, Any]:
    """The structural signature of a family's decoder layer, from the model config and one layer module."""
    signature = {name: _jsonable(_first_attr(config, names)) for name, names in _CONFIG_FIELDS.items()}
    if signature["head_dim"] is None and signature["hidden_size"] and signature["num_attention_heads"]:
        signature["head_dim"] = signature["hidden_size"] // signature["num_attention_heads"]
    if signature["num_key_value_heads"] is None:
        signature["num_key_value_heads"] = signature["num_attention_heads"]
    signature["norm_type"] = sorted({type(m).__name__ for m in layer.modules() if "norm" in type(m).__name__.lower()})
    signature["decoder_layer_class"] = decoder_layer_class_path(layer)
    signature["parameter_shapes"] = {name: list(p.shape) for name, p in sorted(layer.named_parameters())}
    signature["model_type"] = config.model_type
    return signature


def layer_config_fields(config: PreTrainedConfig | dict) -> dict[str, Any]:
    """The config fields that may shape a decoder layer (everything not known to be layer-independent)."""
    data = config if isinstance(config, dict) else config.to_dict()
    return {
        k: _jsonable(v)
        for k, v in data.items()
        if k not in _LAYER_INDEPENDENT and "dropout" not in k and "pdrop" not in k and not k.startswith("_")
    }


@dataclass
class CompatibilityRow:
    """One compared field: the donor's value, the recipient's, and whether the difference blocks a transplant."""

    field: str
    donor: Any
    recipient: Any
    blocking: bool
    warning: str | None = None  # a difference that does not block but should be known (e.g. a slot taken)

    @property
    def matches(self) -> bool:
        return self.donor == self.recipient and self.warning is None


@dataclass
class CompatibilityReport:
    """Field-by-field comparison of an organ's donor signature with a recipient's.

    `report.compatible` is True when no row blocks. `str(report)` renders an aligned table; `report.rows` holds
    every compared field, `report.blocking` only those that block.
    """

    rows: list[CompatibilityRow] = field(default_factory=list)

    @property
    def blocking(self) -> list[CompatibilityRow]:
        return [row for row in self.rows if row.blocking]

    @property
    def compatible(self) -> bool:
        return not self.blocking

    @property
    def warnings(self) -> list[CompatibilityRow]:
        return [row for row in self.rows if row.warning]

    def to_dict(self) -> dict[str, Any]:
        return {
            "compatible": self.compatible,
            "rows": [
                {
                    "field": r.field,
                    "donor": r.donor,
                    "recipient": r.recipient,
                    "matches": r.matches,
                    "blocking": r.blocking,
                    "warning": r.warning,
                }
                for r in self.rows
            ],
        }

    def __str__(self) -> str:
        def short(value: Any) -> str:
            text = str(value)
            return text if len(text) <= 48 else text[:45] + "..."

        lines = [f"{'field':<28} {'donor':<50} {'recipient':<50} status"]
        for r in self.rows:
            status = "BLOCKS" if r.blocking else "WARNS" if r.warning else ("ok" if r.matches else "differs (info)")
            lines.append(f"{r.field:<28} {short(r.donor):<50} {short(r.recipient):<50} {status}")
        verdict = "compatible" if self.compatible else f"INCOMPATIBLE ({', '.join(r.field for r in self.blocking)})"
        return "\n".join(lines + [f"=> {verdict}"])


def compare(organ_config, recipient_config: PreTrainedConfig, recipient_layer: nn.Module) -> CompatibilityReport:
    """Compare an organ's recorded signature and donor config (an `OrganConfig`) with a recipient.

    Besides the structure, the organs the recipient already holds (`config.transplants`) are compared with this
    one: an organ trained for the same slot of the same base model is a warning row ("WARNS"), since two organs
    trained for one slot cannot both sit where they were trained."""
    donor_signature, donor_config = organ_config.signature, organ_config.donor_config
    recipient_signature = structural_signature(recipient_config, recipient_layer)
    rows = []
    for name in recipient_signature:
        donor_value, recipient_value = donor_signature.get(name), recipient_signature[name]
        rows.append(CompatibilityRow(name, donor_value, recipient_value, blocking=donor_value != recipient_value))
    # Every other layer-relevant config field, so nothing silently differs.
    covered = {n for names in _CONFIG_FIELDS.values() for n in names}
    donor_fields = layer_config_fields(donor_config)
    recipient_fields = layer_config_fields(recipient_config)
    for name in sorted((set(donor_fields) | set(recipient_fields)) - covered):
        d, r = donor_fields.get(name), recipient_fields.get(name)
        if d != r:
            rows.append(CompatibilityRow(f"config.{name}", d, r, blocking=True))
    # Information only.
    rows.append(
        CompatibilityRow(
            "num_hidden_layers", organ_config.donor_num_hidden_layers, recipient_config.num_hidden_layers, False
        )
    )
    rows.append(CompatibilityRow("vocab_size", donor_config.get("vocab_size"), recipient_config.vocab_size, False))
    slot = list(organ_config.layer_range or ())
    for held in getattr(recipient_config, "transplants", None) or []:
        same_base = bool(organ_config.base_model) and held.get("base_model") == organ_config.base_model
        if slot and same_base and held.get("donor_layer_range") == slot and held.get("mode") != "excise":
            rows.append(
                CompatibilityRow(
                    "trained slot",
                    f"layers [{slot[0]}, {slot[1]}) of {organ_config.base_model}",
                    f"taken by {held.get('organ') or '(unsaved organ)'} ({held.get('mode')} at {held.get('position')})",
                    False,
                    warning=(
                        f"organ {held.get('organ') or '(unsaved)'} was trained for the same slot (layers "
                        f"[{slot[0]}, {slot[1]}) of {organ_config.base_model}); grafted together, at most one of the "
                        "two sits where it was trained. Compose organs trained for different slots"
                    ),
                )
            )
    return CompatibilityReport(rows)
