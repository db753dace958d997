"""`OrganModel`: an organ's decoder layers as a transformers `PreTrainedModel`, saved as safetensors.

A checkpoint is exactly three files: `config.json` (an `OrganConfig`), `model.safetensors` and `README.md` (the
model card). Integrity is end to end: the config records a sha256 per tensor, and the safetensors header records
the sha256 of the config, so a flipped byte in either file is caught on load, before any weight is used.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import CommitOperationAdd
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel
from transformers.utils.hub import convert_file_size_to_int  # transformers' own parser of '5GB', '500MB'

from .architectures import build_decoder_layer, import_decoder_layer_class
from .atomic import describe_os_error, replace_folder
from .bridges import identity_bridge
from .cards import CARD_MARKER, check_tags, merge_card, render_card
from .configuration_organ import OrganConfig
from .errors import (
    CheckpointFormatError,
    IncompatibleOrganError,
    IntegrityError,
    InvalidArgumentError,
    OrganNotFoundError,
    OutputPathError,
    UnexpectedArgumentError,
)
from .hub import check_revision, evict_snapshot, hub_errors, prepare_repo, remote_card, resolve_checkpoint
from .integrity import config_sha256, tensor_sha256
from .signature import Signature, SignatureBuffers
from .transplant import Transplant, check_compatibility, transplant_into, transplanted

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
CHECKPOINT_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)
# Threads hashing tensors while the next ones are read.
_HASH_THREADS = min(4, os.cpu_count() or 1)
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
        if config.routing_signature:
            self.routing = SignatureBuffers(
                config.signature["hidden_size"], int(config.routing_signature.get("directions", 0))
            )
        self._no_split_modules = [layer_cls.__name__]
        self.post_init()

    @property
    def routing_signature(self) -> Signature | None:
        """What the organ was trained on (`not_hub.signature.Signature`), or None for an organ trained before
        signatures existed, or not in situ (see `not_hub.compute_routing_signature`)."""
        if not self.config.routing_signature or not hasattr(self, "routing"):
            return None
        return Signature.from_parts(self.config.routing_signature, dict(self.routing.named_buffers()))

    def set_routing_signature(self, signature: Signature | None) -> None:
        """Record (or, with None, drop) the organ's routing signature: scalars in the config, tensors as buffers."""
        if signature is None:
            self.config.routing_signature = None
            if hasattr(self, "routing"):
                del self.routing
            return
        buffers = SignatureBuffers(signature.mean.shape[0], signature.directions.shape[0])
        with torch.no_grad():
            for name, tensor in signature.tensors().items():
                getattr(buffers, name).copy_(tensor)
        self.routing = buffers
        self.config.routing_signature = signature.summary()

    def add_bridges(self) -> None:
        """Give the organ identity-initialised bridges (saved with it; used by `mode="bridge"` transplants)."""
        if not self.config.bridges:
            dtype = next(self.parameters()).dtype
            self.bridge_in = identity_bridge(self.config.signature["hidden_size"], dtype=dtype)
            self.bridge_out = identity_bridge(self.config.signature["hidden_size"], dtype=dtype)
            self.config.bridges = True

    def carry(self, other: OrganModel) -> None:
        """Become `other` in place (its config and layers): how a trained organ grows to carry the neighbours its
        recovery trained (`train_organ(method="recovered")`). `other` must be an organ of the same donor."""
        if other.config.signature != self.config.signature:
            raise IncompatibleOrganError("carry(): the other organ has another structural signature")
        self.config = other.config
        self.layers = other.layers
        for name in ("bridge_in", "bridge_out"):
            if hasattr(other, name):
                setattr(self, name, getattr(other, name))

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
        is_main_process: bool = True,
        push_to_hub: bool = False,
        safe_serialization: bool = True,
        max_shard_size: int | str | None = None,
        tags: list[str] | None = None,
        **push_kwargs: Any,
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
            repo_id: the Hub repo the organ is meant for (card snippet, model-index; the push target).
            is_main_process: as in transformers: only the main process of a multi-process run writes (others
                return without touching the disk).
            push_to_hub: also push the folder's organ to `repo_id` (default: the folder's name), with `push_kwargs`
                passed to `push_to_hub`.
            safe_serialization: organs are always safetensors; `False` is refused.
            max_shard_size: an organ is one file; refused if its weights exceed this size.
            tags: extra card tags.

        Returns:
            The paths written (empty when `is_main_process=False`).

        Raises:
            OutputPathError: `save_directory` is an existing file.
            UnexpectedArgumentError: `safe_serialization=False`, a shard size the organ exceeds, or unknown kwargs.
        """
        if not safe_serialization:
            raise UnexpectedArgumentError(
                "safe_serialization=False: organs are stored as safetensors only (never pickle); drop the argument"
            )
        self._check_shard_size(max_shard_size)
        tags = check_tags(tags)
        if push_kwargs and not push_to_hub:
            raise UnexpectedArgumentError(f"save_pretrained() got unexpected keyword arguments {sorted(push_kwargs)}")
        if not str(save_directory).strip():
            raise OutputPathError("save_directory is empty; pass the folder to write the organ into")
        save_directory = Path(save_directory)
        if save_directory.exists() and not save_directory.is_dir():
            raise OutputPathError(f"save_directory={str(save_directory)!r} is an existing file; pass a folder path")
        if not is_main_process:
            return []
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
        self.config.tensor_sha256 = {name: tensor_sha256(t) for name, t in sorted(state.items())}
        self.config.dtype = next(iter(state.values())).dtype
        self.config.architectures = [type(self).__name__]
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
                (folder / CARD_NAME).write_text(render_card(self.config, repo_id, tags))

        try:
            replace_folder(save_directory, write)
        except (OSError, SafetensorError) as err:
            raise OutputPathError(
                f"could not save the organ to {str(save_directory)!r}: {describe_os_error(err)}. Nothing was "
                "changed there (a previous checkpoint in it is intact); free space or pick another folder"
            ) from None
        if push_to_hub:
            self.push_to_hub(repo_id or save_directory.name, tags=tags, **push_kwargs)
        return [str(save_directory / name) for name in CHECKPOINT_FILES]

    def _check_shard_size(self, max_shard_size: int | str | None) -> None:
        if max_shard_size is None:
            return
        try:
            limit = convert_file_size_to_int(max_shard_size)
        except (ValueError, TypeError):
            raise InvalidArgumentError(
                f"max_shard_size={max_shard_size!r} is not a size such as '5GB' or 500_000_000"
            ) from None
        size = sum(p.numel() * p.element_size() for p in self.parameters())
        if size > limit:
            raise UnexpectedArgumentError(
                f"max_shard_size={max_shard_size!r}: this organ's weights are {size:,} bytes and an organ is saved as "
                "one file (it is never sharded); raise the limit or drop the argument"
            )

    def push_to_hub(
        self,
        repo_id: str,
        *,
        revision: str | None = None,
        branch: str | None = None,
        private: bool | None = None,
        commit_message: str | None = None,
        commit_description: str | None = None,
        token: str | bool | None = None,
        create_pr: bool = False,
        tags: list[str] | None = None,
        max_shard_size: int | str | None = None,
        safe_serialization: bool = True,
        overwrite_card: bool = False,
        **kwargs: Any,
    ) -> str:
        """Upload the organ as one commit holding `config.json`, `model.safetensors` and `README.md`.

        Creates the repo if needed (and the branch, from main, if it does not exist). A card already in the repo
        that was written by hand is kept, with the organ's metadata merged into its YAML (its own values win; tags
        are united), as transformers and peft do; a card generated by not_hub is regenerated.

        Args:
            repo_id: `"namespace/name"` of the organ repo.
            revision / branch: the branch to commit to (default: main); `branch` is ModelHubMixin's name for it.
            private: visibility of a newly created repo.
            commit_message: default `"Upload organ layers [start, stop) of <base_model>"`.
            commit_description: the commit's longer description.
            token: Hub token.
            create_pr: open a pull request instead of committing to the branch.
            tags: extra tags for the card's metadata.
            max_shard_size, safe_serialization: as in `save_pretrained`.
            overwrite_card: replace a hand-written card instead of merging into it.

        Returns:
            The commit URL (or the pull request URL with `create_pr=True`).
        """
        if kwargs:
            raise UnexpectedArgumentError(f"push_to_hub() got unexpected keyword arguments {sorted(kwargs)}")
        if branch is not None and revision is not None and branch != revision:
            raise InvalidArgumentError(f"revision={revision!r} and branch={branch!r} disagree; pass one of them")
        revision = revision if revision is not None else branch
        if not safe_serialization:
            raise UnexpectedArgumentError("safe_serialization=False: organs are stored as safetensors only")
        self._check_shard_size(max_shard_size)
        tags = check_tags(tags)
        check_revision(revision)
        api = prepare_repo(repo_id, revision=revision, private=private, token=token)
        start, stop = self.config.layer_range
        message = commit_message or f"Upload organ layers [{start}, {stop}) of {self.config.base_model}"
        existing = None if overwrite_card else remote_card(api, repo_id, revision)
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, overwrite_card=True, repo_id=repo_id, tags=tags)
            card = Path(tmp) / CARD_NAME
            if existing is not None and CARD_MARKER not in existing:
                card.write_text(merge_card(existing, card.read_text()))
            operations = [
                CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(Path(tmp) / name))
                for name in CHECKPOINT_FILES
            ]
            with hub_errors(f"pushing organ to {repo_id!r}"):
                info = api.create_commit(
                    repo_id,
                    operations,
                    commit_message=message,
                    commit_description=commit_description,
                    revision=revision,
                    create_pr=create_pr,
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
        force_download: bool = False,
        subfolder: str = "",
        verify_integrity: bool = True,
        dtype: torch.dtype | str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        device_map: str | int | torch.device | dict | None = None,
        low_cpu_mem_usage: bool | None = None,
        use_safetensors: bool | None = None,
        attn_implementation: str | None = None,
        config: OrganConfig | None = None,
        **kwargs: Any,
    ) -> OrganModel:
        """Load an organ from a local folder or a Hub repo id, strictly and with its integrity checked.

        Takes the arguments users pass to every transformers `from_pretrained`, with their meaning.

        Args:
            pretrained_model_name_or_path: a folder holding the three checkpoint files, or a Hub `repo_id`.
            revision: the organ repo's branch, tag or commit sha (not the donor's revision, which the config
                records as `base_model_revision`).
            cache_dir: Hub cache folder (default: the huggingface_hub cache).
            local_files_only: never touch the network; load from the cache.
            token: Hub token for private repos.
            force_download: download the files again even if they are cached.
            subfolder: the organ's folder inside the repo or directory.
            verify_integrity: check every tensor's and the config's sha256 (default True).
            dtype: `torch.float32`, `"bfloat16"`, ... or `"auto"` (as saved, the default).
            torch_dtype: the deprecated spelling of `dtype` (a FutureWarning, as in transformers 5).
            device_map: where the organ goes: a device (`"cpu"`, `"cuda:0"`, `0`), `"auto"` (the first GPU if
                any, else the CPU: an organ is small and placed whole), or `{"": device}`.
            low_cpu_mem_usage: accepted; organs are always loaded tensor by tensor from safetensors.
            use_safetensors: organs are safetensors only; `False` is refused.
            attn_implementation: `"eager"`, `"sdpa"`, ... for the organ's own attention (after a transplant the
                layers follow the recipient's setting).
            config: an `OrganConfig` to use instead of the saved one's Python object; it must describe the same
                organ (layer range and signature), else it is refused.

        Returns:
            The `OrganModel`, in eval mode.

        Raises:
            OrganNotFoundError: no such folder, repo, revision or file (or offline without a cached copy).
            CheckpointFormatError: not an organ, a newer format, missing or unexpected tensors.
            UnsafeCheckpointError: the config names code outside transformers' own modules.
            IntegrityError: a tensor's or the config's bytes differ from what was saved.
            UnexpectedArgumentError: an argument that cannot apply to an organ.
        """
        for ignored in ("_from_auto", "adapter_kwargs", "_commit_hash", "output_loading_info"):
            kwargs.pop(ignored, None)
        # The Auto classes forward some options unset (transformers 5.2x passes `proxies=None`): unset is no request.
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        if kwargs.pop("trust_remote_code", None):
            logger.info("trust_remote_code is not needed: an organ never runs code from its checkpoint")
        if model_args or kwargs:
            raise UnexpectedArgumentError(
                f"from_pretrained() got unexpected arguments {list(model_args) + sorted(kwargs)}"
            )
        if torch_dtype is not None:
            warnings.warn("`torch_dtype` is deprecated; use `dtype`", FutureWarning, stacklevel=2)
            if dtype is not None and dtype != torch_dtype:
                raise InvalidArgumentError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; pass dtype")
            dtype = torch_dtype
        if use_safetensors is False:
            raise UnexpectedArgumentError("use_safetensors=False: organs are stored as safetensors only")
        target_dtype = _resolve_dtype(dtype)
        device = _resolve_device(device_map)
        folder, from_hub = resolve_checkpoint(
            pretrained_model_name_or_path,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
            force_download=force_download,
            subfolder=subfolder,
        )
        try:
            saved_config, tensors = _read_checkpoint(folder, str(pretrained_model_name_or_path), verify_integrity)
        except IntegrityError:
            if from_hub:
                # Drop the bad download from the Hub cache, so a retry downloads it again instead of failing the same
                # way (or, worse, loading it later with verify_integrity=False by mistake).
                evict_snapshot(folder)
            raise
        if config is not None:
            same = (
                isinstance(config, OrganConfig)
                and tuple(config.layer_range or ()) == tuple(saved_config.layer_range)
                and config.signature == saved_config.signature
                and config.layer_indices == saved_config.layer_indices
            )
            if not same:
                raise UnexpectedArgumentError(
                    "config= describes another organ than the checkpoint (layer range, layer sources or signature "
                    "differ); load the checkpoint without config=, or pass its own OrganConfig"
                )
            saved_config = config
        skeleton = _check_config_against_weights(cls, saved_config, tensors, folder)
        model = _materialize(cls, skeleton, saved_config, tensors, folder)
        model.to(target_dtype or next(iter(tensors.values())).dtype)
        if device is not None:
            model.to(device)
        if attn_implementation is not None:
            _set_attn_implementation(model, attn_implementation)
        model.name_or_path = str(pretrained_model_name_or_path)
        model.config.name_or_path = str(pretrained_model_name_or_path)
        model.organ_revision = revision
        return model.eval()


def _check_config_against_weights(cls, config: OrganConfig, tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """Check the config against the weights file before any layer is allocated.

    A small checkpoint could otherwise ask for anything: a config naming 100,000 layers, or a 4096-wide donor,
    would allocate gigabytes before the weights were found not to fit. The layer count is compared first (no
    construction at all), then the organ is built on the `meta` device (shapes only, no memory) and every tensor's
    name and shape compared.
    """
    found = {
        int(name.split(".")[1]) for name in tensors if name.startswith("layers.") and name.split(".")[1].isdigit()
    }
    try:
        expected = len(config.layer_indices)
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointFormatError(f"{folder / CONFIG_NAME} describes no valid layers ({err})") from None
    if found != set(range(expected)):
        raise CheckpointFormatError(
            f"{folder / CONFIG_NAME} describes {expected} layers (layer_range {config.layer_range}) but "
            f"{folder / WEIGHTS_NAME} holds weights for {len(found)}; the files do not belong together. "
            "Re-save the organ with OrganModel.save_pretrained"
        )
    with torch.device("meta"):
        skeleton = cls(config)
    shapes = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    wrong = [
        f"{name} {tuple(t.shape)} (config: {shapes[name]})"
        for name, t in tensors.items()
        if name in shapes and tuple(t.shape) != shapes[name]
    ]
    if wrong:
        raise CheckpointFormatError(
            f"{folder / WEIGHTS_NAME} does not fit the layers {folder / CONFIG_NAME} describes: "
            f"{', '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}"
        )
    return skeleton


def _materialize(cls, skeleton: OrganModel, config: OrganConfig, tensors: dict[str, torch.Tensor], folder: Path):
    """The organ with the checkpoint's tensors as its weights, built without initialising random weights first.

    The `meta` skeleton takes the loaded tensors as they are (`assign=True`: no allocation, no copy, no init). A
    family whose layers compute buffers at construction (not saved, so still on `meta`) is built for real instead.
    """
    result = skeleton.load_state_dict(tensors, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointFormatError(
            f"{folder / WEIGHTS_NAME} does not fit the layers its config describes: missing {result.missing_keys}, "
            f"unexpected {result.unexpected_keys}"
        )
    if not any(t.is_meta for t in itertools.chain(skeleton.parameters(), skeleton.buffers())):
        return skeleton
    model = cls(config)
    model.load_state_dict(tensors, strict=False)
    return model


def _is_index(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_config_values(raw: dict, config_path: Path) -> None:
    """Every field the loader relies on, of the type and range it must have, before anything is built from it.

    The config comes from whoever published the checkpoint; a wrong type must be a `CheckpointFormatError` naming
    the field, never a raw AttributeError / TypeError from deep inside, and never a silent reinterpretation (a
    bool taken as a layer index, a negative start counted from the end).
    """

    def bad(field: str, expected: str) -> CheckpointFormatError:
        value = raw.get(field)
        return CheckpointFormatError(
            f"{config_path}: {field}={str(value)[:80]} ({type(value).__name__}) is not {expected}; the organ config "
            "is corrupt or was not written by OrganModel.save_pretrained"
        )

    version = raw.get("format_version", "1.0")
    major = str(version).split(".")[0]
    if not isinstance(version, str) or not major.isdigit() or int(major) < 1:
        raise bad("format_version", "a version 'major.minor' with major >= 1")
    span = raw.get("layer_range")
    if not (isinstance(span, list) and len(span) == 2 and all(map(_is_index, span)) and span[0] < span[1]):
        raise bad("layer_range", "[start, stop] with 0 <= start < stop, both integers")
    for field in ("signature", "donor_config", "tensor_sha256"):
        if not isinstance(raw.get(field), dict) or not raw.get(field):
            raise bad(field, "a non-empty JSON object")
    hidden = raw["signature"].get("hidden_size")
    if not (_is_index(hidden) and hidden > 0):
        raise CheckpointFormatError(
            f"{config_path}: signature.hidden_size={str(hidden)[:40]} ({type(hidden).__name__}) is not a positive "
            "integer; the organ config is corrupt or was not written by OrganModel.save_pretrained"
        )
    if not isinstance(raw["signature"].get("decoder_layer_class"), str):
        raise bad("signature", 'an object with "decoder_layer_class" (a string "module:Class")')
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in raw["tensor_sha256"].items()):
        raise bad("tensor_sha256", "an object of tensor name -> sha256 hex string")
    if not isinstance(raw.get("donor_model_type"), str):
        raise bad("donor_model_type", "a transformers model_type string")
    sources = raw.get("layer_sources")
    if sources is not None and not (
        isinstance(sources, list)
        and sources
        and all(
            isinstance(x, dict) and _is_index(x.get("index")) and x.get("role") in ("organ", "neighbour")
            for x in sources
        )
    ):
        raise bad("layer_sources", 'a list of {"role": "organ" | "neighbour", "index": int >= 0}')
    default = raw.get("default_transplant")
    if default is not None and not (
        isinstance(default, dict)
        and default.get("mode") in ("replace", "insert", "bridge", "splice")
        and _is_index(default.get("position"))
        and (default.get("remove") is None or _is_index(default.get("remove")))
    ):
        raise bad("default_transplant", 'an object {"mode": replace | insert | bridge | splice, "position": int >= 0}')


def _check_tensor_dtypes(tensors: dict[str, torch.Tensor], weights_path: Path) -> None:
    """One floating dtype for every tensor: an integer tensor would be truncated into the layers, and one fp16
    tensor among fp32 ones would silently turn the whole organ fp16."""
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) > 1 or not all(d.is_floating_point for d in dtypes):
        found = sorted({f"{name}: {t.dtype}" for name, t in tensors.items()})[:4]
        raise CheckpointFormatError(
            f"{weights_path} mixes dtypes or holds non-floating tensors ({', '.join(found)} ...); an organ's tensors "
            "share one floating dtype. Re-save the organ with OrganModel.save_pretrained"
        )


_ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


def _resolve_dtype(dtype) -> torch.dtype | None:
    """None / "auto": as saved. A torch.dtype or its name ("bfloat16", "torch.float16")."""
    if dtype is None or dtype == "auto":
        return None
    resolved = dtype
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise InvalidArgumentError(
            f"dtype={dtype!r} is not a torch dtype; pass e.g. torch.bfloat16, 'float32' or 'auto'"
        )
    if not resolved.is_floating_point:
        raise InvalidArgumentError(
            f"dtype={dtype!r} is not a floating dtype (organ weights are floats); pass e.g. torch.bfloat16, "
            "'float32' or 'auto'"
        )
    return resolved


def _resolve_device(device_map) -> torch.device | None:
    """An organ is placed whole: one device, from a device, "auto" or {"": device}."""
    if device_map is None:
        return None
    if isinstance(device_map, dict):
        if set(device_map) != {""}:
            raise UnexpectedArgumentError(
                f"device_map={device_map!r}: an organ is placed whole (it is a few layers; after a transplant each "
                "layer follows the device of its neighbours); pass one device, 'auto' or {'': device}"
            )
        device_map = device_map[""]
    if device_map == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(device_map)
    except (RuntimeError, TypeError):
        raise InvalidArgumentError(
            f"device_map={device_map!r} is not a device; pass 'cpu', 'cuda:0', 0 or 'auto'"
        ) from None
    if device.type == "meta":
        raise UnexpectedArgumentError(
            f"device_map={device_map!r} would load the organ without its weights (meta holds shapes only); pass a "
            "real device, or build a skeleton with `with torch.device('meta'): OrganModel(config)`"
        )
    if device.type != "cpu":
        backend = getattr(torch, device.type, None)
        available = backend is not None and hasattr(backend, "is_available") and backend.is_available()
        count = backend.device_count() if available and hasattr(backend, "device_count") else 0
        if not available or (device.index is not None and device.index >= count):
            raise InvalidArgumentError(
                f"device_map={device_map!r}: this machine has no such device ({device.type} devices available: "
                f"{count}); pass 'cpu' or 'auto'"
            )
    return device


def _set_attn_implementation(model: OrganModel, implementation: str) -> None:
    if implementation not in _ATTN_IMPLEMENTATIONS:
        raise InvalidArgumentError(f"attn_implementation={implementation!r} is not one of {_ATTN_IMPLEMENTATIONS}")
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and module is not model:
            config._attn_implementation = implementation


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
    except RecursionError:
        raise CheckpointFormatError(f"{config_path} nests JSON too deeply to be an organ config") from None
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
    _check_config_values(raw_config, config_path)
    if not weights_path.is_file():
        raise OrganNotFoundError(f"{name} has no {WEIGHTS_NAME}; the organ checkpoint is incomplete")
    try:
        with safe_open(weights_path, framework="pt") as f:
            metadata, keys = f.metadata() or {}, list(f.keys())
    except (SafetensorError, OSError, ValueError) as err:
        raise IntegrityError(f"{weights_path} is not a readable safetensors file ({err})") from None

    config = OrganConfig(**raw_config)  # what from_dict does, without dumping the config into a log message
    expected = set(config.tensor_sha256)
    if set(keys) != expected:
        missing, unexpected = sorted(expected - set(keys)), sorted(set(keys) - expected)
        raise CheckpointFormatError(
            f"{weights_path} does not hold the tensors its config lists: missing {missing}, unexpected {unexpected}"
        )
    if verify_integrity:
        recorded = metadata.get(_CONFIG_HASH_KEY)
        if recorded != config_sha256(raw_config):
            raise IntegrityError(
                f"{config_path} does not match the config saved with {weights_path.name} (sha256 {recorded!s:.12}...): "
                "it was edited after saving, or a save into this folder finished while it was being read (then "
                "load again). Re-save with OrganModel.save_pretrained, or pass verify_integrity=False to load it anyway"
            )
    # Each tensor is hashed (in a thread: hashlib releases the GIL) while the next one is read.
    tensors, digests = {}, {}
    try:
        with safe_open(weights_path, framework="pt") as f, ThreadPoolExecutor(_HASH_THREADS) as pool:
            for key in keys:
                tensors[key] = f.get_tensor(key)
                if verify_integrity:
                    digests[key] = pool.submit(tensor_sha256, tensors[key])
    except (SafetensorError, OSError, ValueError) as err:
        raise IntegrityError(f"{weights_path} is not a readable safetensors file ({err})") from None
    _check_tensor_dtypes(tensors, weights_path)
    for key, digest in digests.items():
        if digest.result() != config.tensor_sha256[key]:
            raise IntegrityError(
                f"tensor {key!r} in {weights_path} does not match its recorded sha256: the file was altered or "
                "corrupted, or a save into this folder finished while it was being read (then load again). "
                "Download it again (or pass verify_integrity=False to load anyway)"
            )
    return config, tensors
