"""Every exception and warning not_hub raises.

Each error subclasses both `NotHubError` (catch everything from this library) and the builtin a caller would
naturally catch (`ValueError`, `FileNotFoundError`, ...), as huggingface_hub's `errors.py` does.
Messages say what was passed, what is allowed, and how to fix it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .compatibility import CompatibilityReport


class NotHubError(Exception):
    """Base class of every error raised by not_hub."""


class UnsupportedArchitectureError(NotHubError, ValueError):
    """The model is not a decoder-only causal LM whose layer stack not_hub can find."""


class InvalidLayerRangeError(NotHubError, ValueError):
    """`layer_range=(start, stop)` does not fit the donor's layer stack."""


class InvalidPositionError(NotHubError, ValueError):
    """A transplant `position` is out of range or overlaps an organ already transplanted."""


class InvalidModeError(NotHubError, ValueError):
    """A transplant `mode` is not one of the supported modes."""


class IncompatibleOrganError(NotHubError, ValueError):
    """The organ's structural signature does not match the recipient's.

    The full `CompatibilityReport` is available as `.report`.
    """

    def __init__(self, message: str, report: CompatibilityReport | None = None):
        super().__init__(message)
        self.report = report


class IncompatibleAdapterError(NotHubError, ValueError):
    """A peft adapter was trained on another transplant state (organs, positions, depth) than the model given."""


class CheckpointFormatError(NotHubError, ValueError):
    """An organ checkpoint is malformed, of a newer format version, or not an organ at all."""


class UnsafeCheckpointError(CheckpointFormatError):
    """A checkpoint names code to run (a layer class outside transformers' own model for its `model_type`).

    Loading never imports a module chosen by the checkpoint; such a checkpoint is refused before anything runs.
    """


class IntegrityError(NotHubError, ValueError):
    """An organ checkpoint's bytes do not match the sha256 recorded when it was saved."""


class OrganNotFoundError(NotHubError, FileNotFoundError):
    """No organ checkpoint could be found at the given path, repo id or revision."""


class TransplantStateError(NotHubError, RuntimeError):
    """A transplant record was used in a state that does not allow it (e.g. explanted twice)."""


class InvalidArgumentError(NotHubError, ValueError):
    """An argument's value is outside what it allows (a training length, rate, block size, radius, prompt, ...)."""


class RunDirMismatchError(NotHubError, ValueError):
    """A training run directory was started by a different run (organ, donor, data or hyper-parameters)."""


class DataError(NotHubError, ValueError):
    """Documents could not be loaded, split or packed (empty, binary, malformed, missing field, too few)."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data path is neither a file, a folder of text files, nor a Hub dataset id."""


class ModelLoadError(NotHubError, OSError):
    """A donor or recipient model (or its tokenizer) could not be loaded from the given id, folder or file."""


class AdapterNotFoundError(NotHubError, FileNotFoundError):
    """A local adapter folder does not exist (a path is never taken for a Hub repo id)."""


class RunDirInUseError(NotHubError, BlockingIOError):
    """Another training process is using the same run dir right now."""


class ExportError(NotHubError, RuntimeError):
    """Exporting a model to another format failed in the converter (e.g. llama.cpp's `convert_hf_to_gguf.py`)."""


class DistributedSetupError(NotHubError, RuntimeError):
    """The processes of a launch do not see each other (each would train alone and write the same run dir)."""


class HubConnectionError(NotHubError, ConnectionError):
    """The Hub could not be reached or a download was interrupted (nothing partial is used)."""


class HubRequestError(NotHubError, OSError):
    """The Hub refused a request (an HTTP error status: unauthorised, forbidden, conflict, server error, ...)."""


class UnexpectedArgumentError(NotHubError, TypeError):
    """A keyword argument a function does not take (or one that cannot apply to an organ)."""


class InvalidRepoIdError(NotHubError, ValueError):
    """A Hub repo id is malformed (it must look like 'namespace/name')."""


class OutputPathError(NotHubError, FileExistsError):
    """An output path cannot be written as asked (e.g. a checkpoint folder path that is an existing file)."""


class NotHubWarning(UserWarning):
    """Base class of every warning emitted by not_hub."""


class SameSlotWarning(NotHubWarning):
    """Two organs trained for the same slot of the same base model are grafted into one recipient: at most one of
    them sits where it was trained."""


class UnknownConfigKeyWarning(NotHubWarning):
    """An organ config holds keys this version does not know (written by a newer not_hub); they are dropped."""
