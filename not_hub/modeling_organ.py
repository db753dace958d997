"""`OrganModel`: an organ's decoder layers as a transformers `PreTrainedModel`, saved as safetensors.

A checkpoint is exactly three files: `config.json` (an `OrganConfig`), `model.safetensors` and `README.md` (the
model card). Integrity is end to end: the config records a sha256 per tensor, and the safetensors header records
the sha256 of the config, so a flipped byte in either file is caught on load, before any weight is used.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import CommitOperationAdd
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel

from .architectures import build_decoder_layer, import_decoder_layer_class
from .atomic import replace_folder
from .bridges import identity_bridge
from .cards import CARD_MARKER, render_card
from .configuration_organ import OrganConfig
from .errors import (
    CheckpointFormatError,
    IntegrityError,
    InvalidArgumentError,
    OrganNotFoundError,
    OutputPathError,
    UnexpectedArgumentError,
)
from .hub import evict_snapshot, hub_errors, prepare_repo, resolve_checkpoint
from .integrity import config_sha256, tensor_sha256
from .transplant import Transplant, check_compatibility, transplant_into, transplanted

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
CHECKPOINT_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)
# Key of the safetensors header entry holding the config's sha256.
_CONFIG_HASH_KEY = "not_hub.config_sha256"


class OrganModel(PreTrainedModel):
    r"""k contiguous decoder layers of a donor model, built from the donor family's own layer class.

    The layers keep their donor indices (`layer_idx = start .. stop-1`), so per-layer choices a family makes at
    build time (e.g. Gemma's sliding/full attention alternation) are those of the donor's layers.

    Create one with `not_hub.extract_organ(model)`, load one with `OrganModel.from_pretrained(path_or_repo_id)`,
    and graft it with `organ.transplant_into(recipient)`.

    Example:
        ```python
        >>> from transformers import AutoModelForCausalLM
        >>> import not_hub
        >>> donor = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
        >>> organ = not_hub.extract_organ(donor)  # layers [10, 13)
        >>> organ.save_pretrained("smollm2-organ")
        >>> organ = not_hub.OrganModel.from_pretrained("smollm2-organ")
        >>> transplant = organ.transplant_into(donor, position=4)
        >>> transplant.explant()
        ```
    """

    config_class = OrganConfig
    base_model_prefix = "organ"
    main_input_name = "hidden_states"
    supports_gradient_checkpointing = True

    def __init__(self, config: OrganConfig):
        super().__init__(config)
        if config.layer_range is None or not config.signature:
            raise CheckpointFormatError(
                "OrganConfig has no layer_range or signature; create organs with not_hub.extract_organ(model) "
                "or load them with OrganModel.from_pretrained(...)"
            )
        # Resolve the layer class first: it refuses a class outside transformers' own code before anything else
        # (including the donor config class lookup) runs.
        layer_cls = import_decoder_layer_class(config.signature.get("decoder_layer_class"), config.donor_model_type)
        donor_config = config.donor_layer_config()
        # Each layer is built with its index in the model it came from, so per-layer choices made at build time
        # (e.g. Gemma's sliding/full alternation) are those of that layer.
        self.layers = nn.ModuleList(build_decoder_layer(layer_cls, donor_config, i) for i in config.layer_indices)
        if config.bridges:
            self.bridge_in = identity_bridge(config.signature["hidden_size"])
            self.bridge_out = identity_bridge(config.signature["hidden_size"])
        self._no_split_modules = [layer_cls.__name__]
        self.post_init()

    def add_bridges(self) -> None:
        """Give the organ identity-initialised bridges (saved with it; used by `mode="bridge"` transplants)."""
        if not self.config.bridges:
            dtype = next(self.parameters()).dtype
            self.bridge_in = identity_bridge(self.config.signature["hidden_size"], dtype=dtype)
            self.bridge_out = identity_bridge(self.config.signature["hidden_size"], dtype=dtype)
            self.config.bridges = True

    def _init_weights(self, module: nn.Module) -> None:
        # An organ's weights always come from a donor or a checkpoint; nothing to initialise.
        pass

    @property
    def layer_range(self) -> tuple[int, int]:
        return tuple(self.config.layer_range)

    def forward(
        self,
        hidden_states: torch.Tensor,
        *layer_args: Any,
        layer_inputs: list[tuple[tuple, dict]] | None = None,
        **layer_kwargs: Any,
    ) -> torch.Tensor:
        """Run the organ's layers in order on `hidden_states` (B, T, C).

        The layers need what the donor family passes to each decoder layer besides the hidden state (attention
        mask, position embeddings, ...): either the same `layer_args` / `layer_kwargs` for every layer, or one
        `(args, kwargs)` per layer in `layer_inputs`, as recorded by `not_hub.capture_layer_inputs`.
        """
        if layer_inputs is not None and len(layer_inputs) != len(self.layers):
            raise InvalidArgumentError(
                f"layer_inputs has {len(layer_inputs)} entries for an organ of {len(self.layers)} layers"
            )
        for i, layer in enumerate(self.layers):
            if layer_inputs is not None:
                layer_args, layer_kwargs = layer_inputs[i]
            out = layer(hidden_states, *layer_args, **layer_kwargs)
            # Most families return the hidden states; a few (bloom, falcon) still return a tuple.
            hidden_states = out[0] if isinstance(out, tuple) else out
        return hidden_states

    def check_compatibility(self, recipient: nn.Module):
        """Compare this organ's structural signature with a recipient's, field by field.

        Args:
            recipient: a transformers causal LM (`AutoModelForCausalLM`).

        Returns:
            `CompatibilityReport`: every signature field with donor and recipient values and whether it blocks.
            `report.compatible` is True when nothing blocks.

        Raises:
            UnsupportedArchitectureError: the recipient is not a decoder-only causal LM.
        """
        return check_compatibility(self, recipient)

    def transplant_into(
        self, recipient: nn.Module, *, position: int | None = None, mode: str | None = None, remove: int | None = None
    ) -> Transplant:
        """Graft this organ into `recipient`, in place; returns a `Transplant` whose `.explant()` undoes it.

        Args:
            recipient: a transformers decoder-only causal LM (`AutoModelForCausalLM`).
            position: 0-based index of the first recipient layer the organ occupies (default: the organ's
                `default_transplant`, else its donor start).
            mode: "replace", "insert", "bridge" or "splice" (see `not_hub.plan.MODES`); default: the organ's
                `default_transplant` (a recovered organ carrying its neighbours is spliced in), else "replace".
            remove: recipient layers to take out, for mode="splice".

        Raises:
            IncompatibleOrganError, InvalidPositionError, InvalidModeError, UnsupportedArchitectureError; the
            recipient is left exactly as it was.

        Example:
            ```python
            >>> transplant = organ.transplant_into(recipient, position=4, mode="insert")
            >>> transplant.explant()
            ```
        """
        return transplant_into(self, recipient, position=position, mode=mode, remove=remove)

    def transplanted(
        self, recipient: nn.Module, *, position: int | None = None, mode: str | None = None, remove: int | None = None
    ):
        """A context manager: transplant on entry, explant on exit (also on error). Arguments as `transplant_into`.

        Example:
            ```python
            >>> with organ.transplanted(recipient, position=4) as transplant:
            ...     perplexity(recipient, docs, tokenizer=tokenizer)
            ```
        """
        return transplanted(self, recipient, position=position, mode=mode, remove=remove)

    # ------------------------------------------------------------------ saving

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        *,
        overwrite_card: bool = False,
        repo_id: str | None = None,
        **kwargs: Any,
    ) -> list[str]:
        """Write `config.json`, `model.safetensors` and `README.md` into `save_directory`.

        The per-tensor sha256 and the config's sha256 are recomputed on every save, and the card is regenerated
        from the config (no stale numbers). A hand-written `README.md` (one without not_hub's marker) is kept
        unless `overwrite_card=True`; other files already in the folder are kept as they are.

        The save is atomic as a folder: the new checkpoint is written completely into a sibling folder, which then
        takes the place of `save_directory` in one step (an atomic exchange on Linux). A crash at any point leaves
        either the previous checkpoint or the new one, never new config beside old weights.

        Args:
            save_directory: folder to write into (created if needed).
            overwrite_card: replace an existing hand-written README.md.
            repo_id: the Hub repo the organ is meant for, used in the card's usage snippet and model-index.

        Returns:
            The paths written.
        """
        if kwargs.pop("push_to_hub", False):
            raise UnexpectedArgumentError("use organ.push_to_hub(repo_id) to upload an organ")
        for ignored in ("safe_serialization", "max_shard_size", "is_main_process", "state_dict"):
            kwargs.pop(ignored, None)
        if kwargs:
            raise UnexpectedArgumentError(f"save_pretrained() got unexpected keyword arguments {sorted(kwargs)}")
        save_directory = Path(save_directory)
        if save_directory.exists() and not save_directory.is_dir():
            raise OutputPathError(f"save_directory={str(save_directory)!r} is an existing file; pass a folder path")
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
        self.config.tensor_sha256 = {name: tensor_sha256(t) for name, t in sorted(state.items())}
        self.config.dtype = next(iter(state.values())).dtype
        config_text = self.config.to_json_string(use_diff=False)
        config_hash = config_sha256(json.loads(config_text))
        card_path = save_directory / CARD_NAME
        keep_card = (
            not overwrite_card and card_path.is_file() and CARD_MARKER not in card_path.read_text(errors="replace")
        )
        if keep_card:
            logger.info("keeping the hand-written %s (pass overwrite_card=True to regenerate it)", card_path)

        def write(folder: Path) -> None:
            (folder / CONFIG_NAME).write_text(config_text)
            save_file(state, folder / WEIGHTS_NAME, metadata={"format": "pt", _CONFIG_HASH_KEY: config_hash})
            if not keep_card:
                (folder / CARD_NAME).write_text(render_card(self.config, repo_id))

        replace_folder(save_directory, write)
        return [str(save_directory / name) for name in CHECKPOINT_FILES]

    def push_to_hub(
        self,
        repo_id: str,
        *,
        revision: str | None = None,
        private: bool | None = None,
        commit_message: str | None = None,
        token: str | bool | None = None,
        create_pr: bool = False,
        **kwargs: Any,
    ) -> str:
        """Upload the organ as one commit holding `config.json`, `model.safetensors` and `README.md`.

        Creates the repo if needed (and the branch `revision`, from main, if it does not exist).

        Args:
            repo_id: `"namespace/name"` of the organ repo.
            revision: branch to commit to (default: main).
            private: visibility of a newly created repo.
            commit_message: default `"Upload organ layers [start, stop) of <base_model>"`.
            token: Hub token.
            create_pr: open a pull request instead of committing to the branch.

        Returns:
            The commit URL (or the pull request URL with `create_pr=True`).
        """
        if kwargs:
            raise UnexpectedArgumentError(f"push_to_hub() got unexpected keyword arguments {sorted(kwargs)}")
        api = prepare_repo(repo_id, revision=revision, private=private, token=token)
        start, stop = self.config.layer_range
        message = commit_message or f"Upload organ layers [{start}, {stop}) of {self.config.base_model}"
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, overwrite_card=True, repo_id=repo_id)
            operations = [
                CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(Path(tmp) / name))
                for name in CHECKPOINT_FILES
            ]
            with hub_errors(f"pushing organ to {repo_id!r}"):
                info = api.create_commit(
                    repo_id, operations, commit_message=message, revision=revision, create_pr=create_pr
                )
        return info.pr_url if create_pr else info.commit_url

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args: Any,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        verify_integrity: bool = True,
        dtype: torch.dtype | str | None = None,
        **kwargs: Any,
    ) -> OrganModel:
        """Load an organ from a local folder or a Hub repo id, strictly and with its integrity checked.

        Args:
            pretrained_model_name_or_path: a folder holding the three checkpoint files, or a Hub `repo_id`.
            revision: the organ repo's branch, tag or commit sha (not the donor's revision, which the config
                records as `base_model_revision`).
            cache_dir: Hub cache folder (default: the huggingface_hub cache).
            local_files_only: never touch the network; load from the cache.
            token: Hub token for private repos.
            verify_integrity: check every tensor's and the config's sha256 (default True).
            dtype: cast the loaded weights (default: as saved).

        Returns:
            The `OrganModel`, in eval mode.

        Raises:
            OrganNotFoundError: no such folder, repo, revision or file (or offline without a cached copy).
            CheckpointFormatError: not an organ, a newer format, missing or unexpected tensors.
            IntegrityError: a tensor's or the config's bytes differ from what was saved.
        """
        for ignored in ("config", "_from_auto", "trust_remote_code", "adapter_kwargs", "_commit_hash"):
            kwargs.pop(ignored, None)
        if model_args or kwargs:
            raise UnexpectedArgumentError(
                f"from_pretrained() got unexpected arguments {list(model_args) + sorted(kwargs)}"
            )
        folder, from_hub = resolve_checkpoint(
            pretrained_model_name_or_path,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
        )
        try:
            config, tensors = _read_checkpoint(folder, str(pretrained_model_name_or_path), verify_integrity)
        except IntegrityError:
            if from_hub:
                # Drop the bad download from the Hub cache, so a retry downloads it again instead of failing the same
                # way (or, worse, loading it later with verify_integrity=False by mistake).
                evict_snapshot(folder)
            raise
        model = cls(config)
        result = model.load_state_dict(tensors, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise CheckpointFormatError(
                f"{folder / WEIGHTS_NAME} does not fit the layers its config describes: missing {result.missing_keys}, "
                f"unexpected {result.unexpected_keys}"
            )
        if dtype is not None:
            model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        else:
            model.to(next(iter(tensors.values())).dtype)
        model.name_or_path = str(pretrained_model_name_or_path)
        model.config.name_or_path = str(pretrained_model_name_or_path)
        model.organ_revision = revision
        return model.eval()


def _read_checkpoint(folder: Path, name: str, verify_integrity: bool) -> tuple[OrganConfig, dict[str, torch.Tensor]]:
    """Read and check an organ checkpoint folder: organ config first, then tensors, then every sha256."""
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not config_path.is_file():
        raise OrganNotFoundError(
            f"{name} has no {CONFIG_NAME}; an organ checkpoint holds {', '.join(CHECKPOINT_FILES)} "
            "(written by OrganModel.save_pretrained)"
        )
    try:
        raw_config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointFormatError(f"{config_path} is not valid JSON ({err})") from None
    if not isinstance(raw_config, dict):
        raise CheckpointFormatError(
            f"{config_path} holds a JSON {type(raw_config).__name__}, not an object; an organ config is a JSON "
            "object written by OrganModel.save_pretrained"
        )
    if raw_config.get("model_type") != OrganConfig.model_type:
        raise CheckpointFormatError(
            f"{name} is not an organ: its config.json has model_type={raw_config.get('model_type')!r}, expected "
            f"{OrganConfig.model_type!r}. Load models with AutoModelForCausalLM and cut organs from them with "
            "not_hub.extract_organ(model)"
        )
    if not weights_path.is_file():
        raise OrganNotFoundError(f"{name} has no {WEIGHTS_NAME}; the organ checkpoint is incomplete")
    try:
        with safe_open(weights_path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise IntegrityError(f"{weights_path} is not a readable safetensors file ({err})") from None

    config = OrganConfig.from_dict(raw_config)
    expected = set(config.tensor_sha256)
    if set(tensors) != expected:
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise CheckpointFormatError(
            f"{weights_path} does not hold the tensors its config lists: missing {missing}, unexpected {unexpected}"
        )
    if verify_integrity:
        recorded = metadata.get(_CONFIG_HASH_KEY)
        if recorded != config_sha256(raw_config):
            raise IntegrityError(
                f"{config_path} does not match the config saved with {weights_path.name} (sha256 {recorded!s:.12}...): "
                "it was edited after saving. Re-save with OrganModel.save_pretrained, or pass "
                "verify_integrity=False to load it anyway"
            )
        for key, tensor in tensors.items():
            if tensor_sha256(tensor) != config.tensor_sha256[key]:
                raise IntegrityError(
                    f"tensor {key!r} in {weights_path} does not match its recorded sha256: the file was altered or "
                    "corrupted. Download it again (or pass verify_integrity=False to load anyway)"
                )
    return config, tensors
