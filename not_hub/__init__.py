"""not_hub: Neural Organ Transplantation (NOT) organs as first-class Hugging Face Hub citizens.

An organ is k contiguous decoder layers cut out of a pretrained decoder-only transformer; it is saved as a Hub
repo (`config.json`, `model.safetensors`, `README.md`) and grafted into a compatible recipient, reversibly.

Example:
    ```python
    >>> import not_hub
    >>> organ = not_hub.extract_organ(donor, layer_range=(10, 13))
    >>> not_hub.train_organ(organ, donor, blocks, max_seconds=120)
    >>> organ.save_pretrained("my-organ")
    >>> organ = not_hub.OrganModel.from_pretrained("my-organ")
    >>> with organ.transplanted(recipient, position=10) as transplant:
    ...     print(not_hub.perplexity(recipient, docs, tokenizer=tokenizer))
    ```
"""

import importlib
import importlib.util
from typing import TYPE_CHECKING

from transformers import AutoConfig, AutoModel

from . import errors
from .adapters import check_adapter, load_adapter, push_adapter, save_adapter
from .architectures import SUPPORTED_MODEL_TYPES, resolve_architecture
from .compatibility import CompatibilityReport, CompatibilityRow
from .configuration_organ import OrganConfig
from .extraction import default_layer_range, excise, extract_organ
from .grafted import load_grafted
from .grafting import get_organ_model, trainable_parameters, unload_organ
from .growth import grow_organ
from .hub import OrganInfo, list_organs, push_recipient
from .modeling_organ import OrganModel
from .organ_set import OrganSet
from .plan import MODES, TransplantPlan, plan_transplant, valid_positions
from .precision import resolve_mixed_precision
from .routing import Router, route, router_of
from .transplant import Transplant, transplants_of
from .version import __version__

# Training, evaluation and data load on first use: they import datasets, transformers' Trainer and peft (through the
# Trainer), which loading, grafting and publishing an organ never need (about 0.6 s of every `import not_hub`).
_LAZY = {
    "data": ("BlockData", "DocumentSplits", "load_documents", "make_blocks", "split_documents", "stream_blocks"),
    "evaluation": ("PerplexityResult", "SweepResult", "perplexity", "position_sweep"),
    "trainer": ("OrganTrainer", "WallClockBudget", "collate_blocks"),
    "gguf_export": ("export_gguf", "push_gguf"),
    "training": (
        "DEFAULT_LR",
        "OrganTrainingArguments",
        "TrainingMetrics",
        "compute_routing_signature",
        "recover",
        "train_bridges",
        "train_organ",
    ),
}
_LAZY_NAMES = {name: module for module, names in _LAZY.items() for name in names}

if TYPE_CHECKING:
    from .data import BlockData, DocumentSplits, load_documents, make_blocks, split_documents, stream_blocks
    from .evaluation import PerplexityResult, SweepResult, perplexity, position_sweep
    from .gguf_export import export_gguf, push_gguf
    from .trainer import OrganTrainer, WallClockBudget, collate_blocks
    from .training import (
        DEFAULT_LR,
        OrganTrainingArguments,
        TrainingMetrics,
        compute_routing_signature,
        recover,
        train_bridges,
        train_organ,
    )


def __getattr__(name: str):
    """The lazy names above, and any submodule (`not_hub.evaluation.add_evaluation_result`), on first use."""
    if name in _LAZY_NAMES:
        value = getattr(importlib.import_module(f".{_LAZY_NAMES[name]}", __name__), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_NAMES})


AutoConfig.register(OrganConfig.model_type, OrganConfig, exist_ok=True)
AutoModel.register(OrganConfig, OrganModel, exist_ok=True)

__all__ = [
    "DEFAULT_LR",
    "MODES",
    "SUPPORTED_MODEL_TYPES",
    "BlockData",
    "CompatibilityReport",
    "OrganSet",
    "CompatibilityRow",
    "DocumentSplits",
    "OrganConfig",
    "OrganInfo",
    "OrganModel",
    "OrganTrainer",
    "OrganTrainingArguments",
    "PerplexityResult",
    "Router",
    "SweepResult",
    "TrainingMetrics",
    "Transplant",
    "TransplantPlan",
    "WallClockBudget",
    "__version__",
    "check_adapter",
    "collate_blocks",
    "compute_routing_signature",
    "default_layer_range",
    "errors",
    "excise",
    "export_gguf",
    "extract_organ",
    "get_organ_model",
    "grow_organ",
    "list_organs",
    "load_grafted",
    "load_adapter",
    "load_documents",
    "make_blocks",
    "perplexity",
    "plan_transplant",
    "position_sweep",
    "push_adapter",
    "push_gguf",
    "push_recipient",
    "recover",
    "resolve_architecture",
    "resolve_mixed_precision",
    "route",
    "router_of",
    "save_adapter",
    "split_documents",
    "stream_blocks",
    "train_bridges",
    "train_organ",
    "trainable_parameters",
    "transplants_of",
    "unload_organ",
    "valid_positions",
]
