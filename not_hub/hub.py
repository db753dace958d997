"""Hub I/O: resolving organ repo ids through the Hub cache, discovering organs, pushing transplanted models.

Organs themselves are pushed with `OrganModel.push_to_hub` and loaded with `OrganModel.from_pretrained`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, constants, hf_hub_download, scan_cache_dir, snapshot_download
from huggingface_hub.errors import (
    CacheNotFound,
    EntryNotFoundError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

try:  # the HTTP client huggingface_hub uses: httpx2 from huggingface_hub 2.x, httpx before
    import httpx2 as httpx
except ImportError:  # pragma: no cover - huggingface_hub 1.x
    import httpx

from .cards import LIBRARY_TAG, ORGAN_TAG, render_recipient_card
from .errors import (
    HubConnectionError,
    HubRequestError,
    InvalidArgumentError,
    InvalidRepoIdError,
    OrganNotFoundError,
    TransplantStateError,
)
from .transplant import refuse_bridge_save
from .version import __version__

LIBRARY_NAME = "not_hub"  # sent in the User-Agent, as library_name / library_version
_ALLOW = ["config.json", "model.safetensors", "README.md"]


def check_repo_id(repo_id: str) -> str:
    """Validate a Hub repo id ('namespace/name') with huggingface_hub's own rules.

    Raises:
        InvalidRepoIdError: the id is malformed (bad characters, '..', surrounding spaces, too long, ...).
    """
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise InvalidRepoIdError(f"repo id {repo_id!r} is malformed: {err}") from None
    if repo_id.count("/") != 1:
        raise InvalidRepoIdError(f"repo id {repo_id!r} is malformed; expected 'namespace/name'")
    return repo_id


def check_revision(revision) -> None:
    """A branch, tag or commit sha: a string that is not a path (`..` or a leading `/` would address the cache's
    folders, not a revision)."""
    if revision is None:
        return
    if not isinstance(revision, str) or not revision.strip() or ".." in revision or revision.startswith("/"):
        raise InvalidArgumentError(
            f"revision={revision!r} is not a branch, tag or commit sha (no '..', no leading '/'); pass e.g. 'main'"
        )


def _server_error(what: str, err: Exception) -> HubRequestError | None:
    """The Hub answered, but with a server error or something that is not JSON: a named error saying so."""
    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(err, HfHubHTTPError) and status is not None and status >= 500:
        return HubRequestError(
            f"{what}: the Hub answered HTTP {status}, a server error; nothing was changed. Retry later (the Hub's "
            "status page says whether it is down)"
        )
    if isinstance(err, json.JSONDecodeError):
        return HubRequestError(
            f"{what}: the Hub answered with something that is not JSON ({err.doc[:60]!r}...); is HF_ENDPOINT "
            f"({constants.ENDPOINT}) a Hugging Face Hub? Nothing was changed"
        )
    return None


def _connection_error(what: str, err: Exception) -> HubConnectionError:
    detail = str(err).splitlines()[0][:160] if str(err) else ""
    return HubConnectionError(
        f"{what}: the Hub could not be reached or the transfer was interrupted ({type(err).__name__}: {detail}); "
        "nothing partial was kept. Check the connection (HF_ENDPOINT) and retry"
    )


DEFAULT_HUB_TIMEOUT_S = 60.0  # longest wait for one connect / read / write on the Hub; NOT_HUB_HUB_TIMEOUT overrides


def hub_timeout() -> float:
    """Seconds not_hub waits for the Hub on one connection step (`NOT_HUB_HUB_TIMEOUT`, default 60)."""
    try:
        value = float(os.environ.get("NOT_HUB_HUB_TIMEOUT", DEFAULT_HUB_TIMEOUT_S))
    except ValueError:
        value = DEFAULT_HUB_TIMEOUT_S
    return value if value > 0 else DEFAULT_HUB_TIMEOUT_S


class _HubGaveNoAnswer(httpx.TransportError):
    """A request the Hub already let time out, asked again: refused at once. Not one of the errors huggingface_hub
    retries, so a silent server costs one timeout per request, not six and 23 s of back-off (paginated calls such
    as `list_models` retry timeouts five times)."""


class _BoundedTransport(httpx.BaseTransport):
    """Wraps the client's transport: a request's unset (None) timeouts become `seconds`. A client-level timeout is
    not enough: huggingface_hub passes `timeout=None` explicitly (e.g. `model_info`), which means "wait forever".
    A request that timed out is not sent again inside the same `bounded_waits()` block."""

    def __init__(self, inner, seconds: float, timed_out: set[tuple[str, str]]):
        self.inner, self.seconds, self.timed_out = inner, seconds, timed_out

    def handle_request(self, request):
        key = (request.method, str(request.url))
        if key in self.timed_out:
            raise _HubGaveNoAnswer(f"no answer within {self.seconds:g} s, asked twice", request=request)
        given = dict(request.extensions.get("timeout") or {})
        request.extensions["timeout"] = {
            key: self.seconds if given.get(key) is None else given[key] for key in ("connect", "read", "write", "pool")
        }
        try:
            return self.inner.handle_request(request)
        except httpx.TimeoutException:
            self.timed_out.add(key)
            raise

    def close(self) -> None:
        self.inner.close()


@contextmanager
def bounded_waits() -> Iterator[None]:
    """Every request not_hub makes inside this block waits at most `hub_timeout()` seconds per connect, read or write.

    huggingface_hub's default HTTP client never times out (`timeout=None`), so a server that accepts a connection
    and never answers blocks a call forever (`model_info` ignores `HF_HUB_ETAG_TIMEOUT`). A client factory the user
    installed with `huggingface_hub.set_client_factory` is left alone.
    """
    from huggingface_hub.utils import _http

    default = getattr(_http, "default_client_factory", None)
    if default is None or getattr(_http, "_GLOBAL_CLIENT_FACTORY", None) is not default:
        yield
        return
    seconds, timed_out = hub_timeout(), set()

    def bounded():
        client = default()
        inner = getattr(client, "_transport", None)
        if inner is not None:
            client._transport = _BoundedTransport(inner, seconds, timed_out)
        return client

    _http.set_client_factory(bounded)
    try:
        yield
    finally:
        _http.set_client_factory(default)


@contextmanager
def hub_errors(what: str) -> Iterator[None]:
    """Turn connection-level failures of a Hub call into `HubConnectionError` (one line, no traceback); every
    request inside waits at most `hub_timeout()` seconds per step."""
    try:
        with bounded_waits():
            yield
    except OfflineModeIsEnabled:
        raise HubConnectionError(
            f"{what}: the Hub is disabled (HF_HUB_OFFLINE=1); unset it to reach the Hub, or use local folders"
        ) from None
    except HFValidationError as err:
        raise InvalidRepoIdError(f"{what}: {err}") from None
    except json.JSONDecodeError as err:
        raise _server_error(what, err) from None
    except HfHubHTTPError as err:
        answered = _server_error(what, err)
        if answered is not None:
            raise answered from None
        status = getattr(getattr(err, "response", None), "status_code", None)
        raise HubRequestError(
            f"{what}: the Hub refused the request (HTTP {status}): {str(err).splitlines()[0][:200]}. Check the repo "
            "id, your token's permissions (--token / HF_TOKEN) and retry"
        ) from None
    except (httpx.HTTPError, ConnectionError, TimeoutError) as err:
        raise _connection_error(what, err) from None


def resolve_checkpoint(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    force_download: bool = False,
    subfolder: str = "",
) -> tuple[Path, bool]:
    """Return `(folder, from_hub)`: a local folder holding the organ's files, or its Hub cache snapshot.

    Raises:
        OrganNotFoundError: the path does not exist and the repo id, revision or cached copy cannot be found.
    """
    if not str(name_or_path).strip():
        # Path("") is the current folder: an empty argument must not load whatever organ happens to be there.
        raise OrganNotFoundError("the organ name is empty; pass a folder holding an organ or a Hub repo id")
    path = Path(name_or_path)
    subfolder = str(subfolder or "").strip("/")
    if path.is_dir():
        folder = path / subfolder if subfolder else path
        if not folder.is_dir():
            raise OrganNotFoundError(f"{str(path)!r} has no subfolder {subfolder!r}")
        return folder, False
    repo_id = str(name_or_path)
    if path.exists() or repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        raise OrganNotFoundError(
            f"{repo_id!r} is neither a folder holding an organ nor a Hub repo id of the form 'namespace/name'"
        )
    check_repo_id(repo_id)
    check_revision(revision)
    try:
        with bounded_waits():
            folder = Path(
                snapshot_download(
                    repo_id,
                    revision=revision,
                    cache_dir=cache_dir,
                    local_files_only=local_files_only,
                    token=token,
                    force_download=force_download,
                    allow_patterns=[f"{subfolder}/{name}" for name in _ALLOW] if subfolder else _ALLOW,
                    library_name=LIBRARY_NAME,
                    library_version=__version__,
                )
            )
        return (folder / subfolder if subfolder else folder), True
    except RepositoryNotFoundError:
        raise OrganNotFoundError(
            f"organ repo {repo_id!r} was not found on the Hub (or is private: pass token=...)"
        ) from None
    except RevisionNotFoundError:
        raise OrganNotFoundError(
            f"organ repo {repo_id!r} has no revision {revision!r}; pass an existing branch, tag or commit sha"
        ) from None
    except LocalEntryNotFoundError as err:
        answered = _server_error(f"downloading organ repo {repo_id!r}", err.__cause__ or err.__context__)
        if answered is not None:  # the Hub did answer, with a server error or not JSON: not "cannot be reached"
            raise answered from None
        raise OrganNotFoundError(
            f"organ repo {repo_id!r} (revision {revision or 'main'!r}) is not in the local Hub cache and the Hub "
            "cannot be reached (offline, HF_HUB_OFFLINE=1, local_files_only=True, or no answer within "
            f"{hub_timeout():g} s: NOT_HUB_HUB_TIMEOUT sets the wait); download it once online with "
            f"`not-hub pull {repo_id}` or pass a local folder"
        ) from None
    except EntryNotFoundError:
        raise OrganNotFoundError(
            f"organ repo {repo_id!r} has no organ checkpoint files ({', '.join(_ALLOW)})"
        ) from None
    except json.JSONDecodeError as err:
        raise _server_error(f"downloading organ repo {repo_id!r}", err) from None
    except HfHubHTTPError as err:
        answered = _server_error(f"downloading organ repo {repo_id!r}", err)
        if answered is not None:
            raise answered from None
        raise OrganNotFoundError(f"could not download organ repo {repo_id!r}: {err}") from None
    except (httpx.HTTPError, ConnectionError, TimeoutError) as err:
        # e.g. the server closed the connection mid-file: huggingface_hub keeps the partial download under
        # .incomplete and never links it into the snapshot, so nothing half-downloaded can be loaded later.
        raise _connection_error(f"downloading organ repo {repo_id!r}", err) from None


def repo_file(
    name_or_path: str | os.PathLike,
    filename: str,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> Path | None:
    """One file of a local folder or a Hub repo (downloaded through the cache), or None when the repo has no such
    file. Connection failures are named errors (`hub_errors`)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path / filename if (path / filename).is_file() else None
    check_repo_id(str(name_or_path))
    check_revision(revision)
    with hub_errors(f"reading {filename} of {str(name_or_path)!r}"):
        try:
            return Path(
                hf_hub_download(
                    str(name_or_path), filename, revision=revision, token=token, cache_dir=cache_dir,
                    local_files_only=local_files_only, library_name=LIBRARY_NAME, library_version=__version__,
                )
            )  # fmt: skip
        except EntryNotFoundError:
            return None


def evict_snapshot(folder: Path) -> None:
    """Delete a Hub cache snapshot (after a failed integrity check) with huggingface_hub's own cache tools, so a
    retry downloads it again."""
    snapshot = next((p for p in [folder, *folder.parents] if p.parent.name == "snapshots"), None)
    if snapshot is None:
        return
    repo_folder = snapshot.parent.parent
    cache_dir = repo_folder.parent
    try:
        info = scan_cache_dir(cache_dir)
    except CacheNotFound:
        return
    info.delete_revisions(snapshot.name).execute()


def remote_card(api: HfApi, repo_id: str, revision: str | None) -> str | None:
    """The README.md already in a repo at `revision` (None if the repo, branch or card does not exist yet)."""
    with hub_errors(f"reading the card of {repo_id!r}"):
        try:
            path = api.hf_hub_download(repo_id, "README.md", revision=revision)
        except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError, LocalEntryNotFoundError):
            return None
    return Path(path).read_text(errors="replace")


def prepare_repo(repo_id: str, *, revision: str | None, private: bool | None, token: str | bool | None) -> HfApi:
    """Create the model repo if needed, and the branch `revision` (from main) if it does not exist."""
    check_repo_id(repo_id)
    api = HfApi(token=token, library_name=LIBRARY_NAME, library_version=__version__)
    with hub_errors(f"creating repo {repo_id!r}"):
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api


@dataclass(frozen=True)
class OrganInfo:
    """An organ repo found on the Hub by `list_organs`."""

    repo_id: str
    base_model: str | list[str] | None
    tags: tuple[str, ...]
    sha: str | None
    last_modified: str | None


def list_organs(
    base_model: str | None = None,
    *,
    author: str | None = None,
    search: str | None = None,
    limit: int | None = None,
    token: str | bool | None = None,
) -> list[OrganInfo]:
    """Find organ repos on the Hub by the tags their cards carry (`not_hub`, `organ`, `base_model:<id>`).

    Args:
        base_model: only organs cut from this donor (Hub repo id).
        author: only repos of this user or organisation.
        search: a substring of the repo name.
        limit: at most this many results.
        token: Hub token (to see private repos).

    Returns:
        One `OrganInfo` per repo, in the Hub's order.

    Example:
        ```python
        >>> [o.repo_id for o in not_hub.list_organs("HuggingFaceTB/SmolLM2-135M-Instruct")]
        ['someone/smollm2-code-organ']
        ```
    """
    tags = [LIBRARY_TAG, ORGAN_TAG] + ([f"base_model:{base_model}"] if base_model else [])
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InvalidArgumentError(f"limit={limit!r} is not allowed; expected an integer >= 1, or None (all)")
    found = []
    with hub_errors("searching organ repos"):
        models = list(
            HfApi(token=token, library_name=LIBRARY_NAME, library_version=__version__).list_models(
                filter=tags, author=author, search=search, limit=limit, cardData=True
            )
        )
    for info in models:
        card = info.card_data
        found.append(
            OrganInfo(
                repo_id=info.id,
                base_model=getattr(card, "base_model", None) if card is not None else None,
                tags=tuple(info.tags or ()),
                sha=info.sha,
                last_modified=str(info.last_modified) if info.last_modified else None,
            )
        )
    return found


def push_recipient(
    recipient,
    repo_id: str,
    *,
    tokenizer=None,
    revision: str | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    token: str | bool | None = None,
    create_pr: bool = False,
) -> str:
    """Push a transplanted recipient as a plain transformers model repo whose card records its transplants.

    The repo loads with `AutoModelForCausalLM.from_pretrained(repo_id)`, without not_hub. The card's metadata has
    the recipient's `base_model`; its body lists each organ repo and revision, donor layers, position and mode.

    Returns:
        The commit URL (or the pull request URL with `create_pr=True`).
    """
    if any(entry.get("mode") == "bridge" for entry in getattr(recipient.config, "transplants", None) or []):
        refuse_bridge_save()  # before creating any repo: a bridge-mode recipient has no plain-checkpoint form
    if not getattr(recipient.config, "transplants", None):
        raise TransplantStateError("this model carries no transplant; push it with model.push_to_hub(repo_id) instead")
    api = prepare_repo(repo_id, revision=revision, private=private, token=token)
    with tempfile.TemporaryDirectory() as tmp:
        recipient.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (Path(tmp) / "README.md").write_text(render_recipient_card(recipient, repo_id))
        with hub_errors(f"pushing to {repo_id!r}"):
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=tmp,
                revision=revision,
                commit_message=commit_message or f"Upload transplanted {recipient.config.model_type} model",
                create_pr=create_pr,
            )
    return info.pr_url if create_pr else info.commit_url
