"""Hub I/O for organs: resolving a repo id or folder to local checkpoint files through the Hub cache."""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from .errors import OrganNotFoundError

_ALLOW = ["config.json", "model.safetensors", "README.md"]


def resolve_checkpoint(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> Path:
    """Return a local folder holding the organ's files: the folder itself, or a Hub cache snapshot.

    Raises:
        OrganNotFoundError: the path does not exist and the repo id, revision or cached copy cannot be found.
    """
    path = Path(name_or_path)
    if path.is_dir():
        return path
    repo_id = str(name_or_path)
    if path.exists() or repo_id.count("/") != 1 or repo_id.startswith((".", "/")):
        raise OrganNotFoundError(
            f"{repo_id!r} is neither a folder holding an organ nor a Hub repo id of the form 'namespace/name'"
        )
    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                token=token,
                allow_patterns=_ALLOW,
            )
        )
    except RepositoryNotFoundError:
        raise OrganNotFoundError(
            f"organ repo {repo_id!r} was not found on the Hub (or is private: pass token=...)"
        ) from None
    except RevisionNotFoundError:
        raise OrganNotFoundError(
            f"organ repo {repo_id!r} has no revision {revision!r}; pass an existing branch, tag or commit sha"
        ) from None
    except LocalEntryNotFoundError:
        raise OrganNotFoundError(
            f"organ repo {repo_id!r} (revision {revision or 'main'!r}) is not in the local Hub cache and the Hub "
            "cannot be reached (offline, HF_HUB_OFFLINE=1 or local_files_only=True); download it once online with "
            f"`not-hub pull {repo_id}` or pass a local folder"
        ) from None
    except EntryNotFoundError:
        raise OrganNotFoundError(
            f"organ repo {repo_id!r} has no organ checkpoint files ({', '.join(_ALLOW)})"
        ) from None
    except HfHubHTTPError as err:
        raise OrganNotFoundError(f"could not download organ repo {repo_id!r}: {err}") from None
