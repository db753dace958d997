"""`OrganConfig`: everything needed to rebuild, verify, check and describe an organ.

An organ's config is a transformers config with its own `model_type` ("organ"), registered with `AutoConfig`, so
`AutoConfig.from_pretrained(organ_dir)` works once `not_hub` is imported. It records the donor (enough to rebuild
its layers with the donor's own classes), the half-open `layer_range` the organ was cut from, the structural
signature that decides compatibility, a sha256 per tensor, and room for training and evaluation metadata.

Forward compatibility follows peft: keys written by a newer not_hub are dropped with a warning; a newer *major*
`format_version` is refused, since its layout may mean something else.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

from transformers import PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .errors import CheckpointFormatError, UnknownConfigKeyWarning
from .version import __version__

FORMAT_VERSION = "1.0"


class OrganConfig(PreTrainedConfig):
    r"""Configuration of an organ: k contiguous decoder layers cut from a donor causal LM.

    Args:
        format_version (`str`): checkpoint layout version, `"major.minor"`. A newer major version is refused.
        not_hub_version (`str`): the not_hub version that wrote the checkpoint.
        base_model (`str`): the donor's Hub repo id or local path (the card's `base_model`).
        base_model_revision (`str`, *optional*): the donor's revision (branch, tag or commit sha). Distinct from
            the organ's own revision, which is the `revision` its checkpoint is downloaded at.
        donor_model_type (`str`): the donor's `model_type` (e.g. `"llama"`).
        donor_architectures (`list[str]`): the donor config's `architectures`.
        donor_config (`dict`): the donor's full config, enough to rebuild its decoder layers.
        donor_num_hidden_layers (`int`): depth of the donor.
        layer_range (`tuple[int, int]`): half-open `(start, stop)` range of donor layers the organ holds.
        architecture (`dict`): the donor family's `ArchitectureSpec` (with `inferred=True` if discovered).
        signature (`dict`): structural signature (hidden size, heads, KV heads, head dim, intermediate size, norm
            type and eps, activation, rotary settings, attention bias, decoder-layer class, ...).
        tensor_sha256 (`dict[str, str]`): sha256 of every tensor's bytes, checked on load.
        training (`dict`, *optional*): training metadata (data, steps, tokens, lr, losses, wall-clock).
        evaluation (`dict`, *optional*): evaluation results, `{"results": [{"dataset", "dataset_type", "split",
            "metric", "value", "baseline", "position", "mode"}, ...], "best_position": int}`; `baseline` is the
            untouched model's figure on the same data. Rendered in the card and its `model-index`.
        license (`str`, *optional*): the organ's licence, inherited from the donor when known.
        bridges (`bool`): the checkpoint also holds trained linear bridges (`bridge_in`, `bridge_out`) used by
            `transplant_into(..., mode="bridge")`.
        layer_sources (`list[dict]`, *optional*): for an organ exported after recovery, one entry per layer, in
            order: `{"role": "organ" | "neighbour", "index": i}`, where `index` is the layer's index in the model it
            came from (the donor for the organ's own layers, the recipient for recovered neighbours). None: the
            layers are exactly donor layers `layer_range`.
        default_transplant (`dict`, *optional*): how `transplant_into(recipient)` grafts this organ when no mode
            or position is given, e.g. `{"mode": "splice", "position": 9, "remove": 5}` for an organ that carries
            its recovered neighbours. None: `mode="replace"` at `layer_range[0]`.
        neighbours_from (`str`, *optional*): the recipient the recovered neighbours were trained in.
        growth (`dict`, *optional*): for a growth organ (`not_hub.grow_organ`): the layers it was copied from and the
            output projections zeroed to make it start as the identity.
        routing_signature (`dict`, *optional*): what the organ was trained on (`not_hub.signature`): the scalars of
            its signature (directions, threshold, tokens); its tensors are `routing.*` in `model.safetensors`.

    Example:
        ```python
        >>> import not_hub
        >>> from transformers import AutoConfig
        >>> config = AutoConfig.from_pretrained("path/to/organ")  # an OrganConfig
        >>> config.layer_range
        (10, 13)
        ```
    """

    model_type = "organ"

    def __init__(
        self,
        *,
        format_version: str = FORMAT_VERSION,
        not_hub_version: str = __version__,
        base_model: str | None = None,
        base_model_revision: str | None = None,
        donor_model_type: str | None = None,
        donor_architectures: list[str] | None = None,
        donor_config: dict | None = None,
        donor_num_hidden_layers: int | None = None,
        layer_range: tuple[int, int] | list[int] | None = None,
        architecture: dict | None = None,
        signature: dict | None = None,
        tensor_sha256: dict[str, str] | None = None,
        training: dict | None = None,
        evaluation: dict | None = None,
        license: str | None = None,
        bridges: bool = False,
        layer_sources: list[dict] | None = None,
        default_transplant: dict | None = None,
        neighbours_from: str | None = None,
        growth: dict | None = None,
        routing_signature: dict | None = None,
        **kwargs: Any,
    ):
        _check_format_version(format_version)
        unknown = sorted(set(kwargs) - _base_config_keys())
        if unknown:
            warnings.warn(
                f"organ config has keys this not_hub ({__version__}) does not know: {unknown} (written by "
                f"not_hub {not_hub_version}); they are ignored. Upgrade not_hub to use them.",
                UnknownConfigKeyWarning,
                stacklevel=2,
            )
            for key in unknown:
                kwargs.pop(key)
        self.format_version = format_version
        self.not_hub_version = not_hub_version
        self.base_model = base_model
        self.base_model_revision = base_model_revision
        self.donor_model_type = donor_model_type
        self.donor_architectures = list(donor_architectures or [])
        self.donor_config = donor_config or {}
        self.donor_num_hidden_layers = donor_num_hidden_layers
        self.layer_range = tuple(layer_range) if layer_range is not None else None
        self.architecture = architecture or {}
        self.signature = signature or {}
        self.tensor_sha256 = tensor_sha256 or {}
        self.training = training
        self.evaluation = evaluation
        self.license = license
        self.bridges = bool(bridges)
        self.layer_sources = [dict(source) for source in layer_sources] if layer_sources else None
        self.default_transplant = dict(default_transplant) if default_transplant else None
        self.neighbours_from = neighbours_from
        self.growth = dict(growth) if growth else None
        self.routing_signature = dict(routing_signature) if routing_signature else None
        super().__init__(**kwargs)

    @property
    def num_layers(self) -> int:
        """The number of decoder layers the checkpoint holds (the organ's own, plus recovered neighbours if any)."""
        return len(self.layer_indices)

    @property
    def layer_indices(self) -> list[int]:
        """Each layer's index in the model it came from (donor indices for the organ's own layers)."""
        if self.layer_sources:
            return [int(source["index"]) for source in self.layer_sources]
        start, stop = self.layer_range
        return list(range(start, stop))

    @property
    def layer_roles(self) -> list[str]:
        """ "organ" or "neighbour" for each layer."""
        if self.layer_sources:
            return [str(source["role"]) for source in self.layer_sources]
        return ["organ"] * self.num_layers

    def donor_layer_config(self) -> PreTrainedConfig:
        """Rebuild the donor's config object (its family's own class), from which its layers are built."""
        # The class alone (AutoConfig.for_model would build a default config first), called as `from_dict` does,
        # without its eager `logger.info(f"Model config {config}")` (a JSON dump of the config on every load).
        if self.donor_model_type not in CONFIG_MAPPING:
            raise ValueError(f"Unrecognized model type {self.donor_model_type!r} (not a transformers family)")
        config_class = CONFIG_MAPPING[self.donor_model_type]
        donor = config_class(**copy.deepcopy(self.donor_config))
        # A few families pick their attention class at build time from this; layers re-read it at run time from
        # the config they are pointed to (the recipient's, after a transplant).
        donor._attn_implementation = "sdpa"
        return donor

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        if output.get("layer_range") is not None:
            output["layer_range"] = list(output["layer_range"])
        return output


def _check_format_version(format_version: str) -> None:
    try:
        major = int(str(format_version).split(".")[0])
    except ValueError:
        raise CheckpointFormatError(
            f"format_version={format_version!r} is not of the form 'major.minor'; the organ config is corrupt"
        ) from None
    supported_major = int(FORMAT_VERSION.split(".")[0])
    if major > supported_major:
        raise CheckpointFormatError(
            f"this organ has format_version={format_version!r}, newer than the {FORMAT_VERSION!r} this not_hub "
            f"({__version__}) reads; upgrade with `pip install -U not_hub`"
        )


_BASE_KEYS: set[str] | None = None


def _base_config_keys() -> set[str]:
    """Keys any transformers config may carry (written by `PreTrainedConfig.to_dict` or read by its init)."""
    global _BASE_KEYS
    if _BASE_KEYS is None:
        keys = set(PreTrainedConfig().to_dict())
        keys |= {"transformers_version", "model_type", "torch_dtype", "dtype", "name_or_path", "_name_or_path"}
        keys |= {"architectures", "_commit_hash", "attn_implementation", "output_attentions", "return_dict"}
        keys |= {"use_cache", "tie_word_embeddings", "transplants"}
        _BASE_KEYS = keys
    return _BASE_KEYS
