"""not_hub: Neural Organ Transplantation (NOT) organs as first-class Hugging Face Hub citizens.

An organ is k contiguous decoder layers cut out of a pretrained decoder-only transformer; it is saved as a Hub
repo (`config.json`, `model.safetensors`, `README.md`) and grafted into a compatible recipient, reversibly.

Example:
    ```python
    >>> import not_hub
    >>> organ = not_hub.extract_organ(donor, layer_range=(10, 13))
    >>> organ.save_pretrained("my-organ")
    >>> organ = not_hub.OrganModel.from_pretrained("my-organ")
    >>> record = organ.transplant_into(recipient, position=4, mode="replace")
    >>> record.explant()
    ```
"""

from transformers import AutoConfig, AutoModel

from . import errors
from .architectures import SUPPORTED_MODEL_TYPES, resolve_architecture
from .compatibility import CompatibilityReport, CompatibilityRow
from .configuration_organ import OrganConfig
from .extraction import default_layer_range, extract_organ
from .hub import OrganInfo, list_organs, push_recipient
from .modeling_organ import OrganModel
from .transplant import (
    Transplant,
    capture_layer_inputs,
    check_compatibility,
    standalone_shell,
    transplant_into,
    transplanted,
    transplants_of,
)
from .version import __version__

AutoConfig.register(OrganConfig.model_type, OrganConfig, exist_ok=True)
AutoModel.register(OrganConfig, OrganModel, exist_ok=True)

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "CompatibilityReport",
    "CompatibilityRow",
    "OrganConfig",
    "OrganInfo",
    "OrganModel",
    "Transplant",
    "__version__",
    "capture_layer_inputs",
    "check_compatibility",
    "default_layer_range",
    "errors",
    "extract_organ",
    "list_organs",
    "push_recipient",
    "resolve_architecture",
    "standalone_shell",
    "transplant_into",
    "transplanted",
    "transplants_of",
]
