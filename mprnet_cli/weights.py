"""Where each task's checkpoint comes from, and getting it onto disk once, verified.

The registry (`weights.toml`, shipped in the package) names a Hugging Face file per task;
a user config file, `MPRNET_<TASK>_WEIGHTS` or `--weights` can point a task elsewhere.
huggingface_hub does the transfer and owns the only cache (HF_HOME, HF_HUB_CACHE,
HF_HUB_OFFLINE, HF_ENDPOINT and HF_TOKEN apply as usual); this module adds what it lacks:
a sha256 check (the client checks only the size), an architecture check, a record of the
first download's digest when the registry has none, and one clear error per failure.
Nothing here prints: progress goes to the `tqdm_class` the caller passes, and
announcements to the `mprnet` logger.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import tomllib
from dataclasses import dataclass, fields, replace
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx2
from huggingface_hub import HfApi, constants, hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from mprnet_cli.errors import CheckpointError, ConfigError, WeightsUnavailableError

if TYPE_CHECKING:
    from tqdm import tqdm

logger = logging.getLogger("mprnet")

HF_SCHEME = "hf://"

#: Name fragments that make a file in a repo look like a task's checkpoint.
FILENAME_HINTS = {"deblur": ("blur", "gopro"), "derain": ("rain",), "denoise": ("nois", "sidd")}
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".safetensors", ".bin", ".ckpt")

#: Fields that say *which file*: overriding one makes the registry's digest, size and
#: license describe another file, so they are dropped unless given again.
_LOCATION_FIELDS = ("repo_id", "filename", "revision")


@dataclass(frozen=True)
class WeightsEntry:
    """One task's checkpoint on the hub, with what is known about it."""

    task: str
    repo_id: str
    filename: str
    revision: str = "main"
    sha256: str = ""
    size: int | None = None
    n_feat: int | None = None
    scale_unetfeats: int | None = None
    scale_orsnetfeats: int | None = None
    trained_on: str = ""
    benchmark: str = ""
    psnr_db: float | None = None
    ssim: float | None = None
    license: str = "not stated: check the source's own terms"
    origin: str = ""

    @property
    def uri(self) -> str:
        """`hf://owner/repo/file@revision`: also the key of the first-download record."""
        return f"{HF_SCHEME}{self.repo_id}/{self.filename}@{self.revision}"


# --- the registry and the user's overrides -------------------------------------------


def config_dir() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "mprnet"


def state_dir() -> Path:
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "mprnet"


def user_config_path() -> Path:
    return config_dir() / "weights.toml"


def env_variable(task: str) -> str:
    return f"MPRNET_{task.upper()}_WEIGHTS"


def _read_toml(text: str, where: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{where} is not valid TOML ({error}): fix or remove it") from error


def _check_keys(task: str, table: dict[str, Any], where: str) -> None:
    known = {f.name for f in fields(WeightsEntry)} - {"task"}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} in [{task}]; known keys: {', '.join(sorted(known))}")


def _entry(task: str, table: dict[str, Any], where: str) -> WeightsEntry:
    _check_keys(task, table, where)
    try:
        return WeightsEntry(task=task, **table)
    except TypeError as error:
        raise ConfigError(f"{where}: [{task}] needs at least repo_id and filename ({error})") from error


def load_registry() -> dict[str, WeightsEntry]:
    """The package's registry with the user config file's tables laid over it."""
    text = resources.files("mprnet_cli").joinpath("weights.toml").read_text(encoding="utf-8")
    registry = {task: _entry(task, table, "weights.toml") for task, table in _read_toml(text, "weights.toml").items()}
    path = user_config_path()
    if not path.is_file():
        return registry
    for task, table in _read_toml(path.read_text(encoding="utf-8"), str(path)).items():
        if task not in registry:
            raise ConfigError(f"{path}: unknown task [{task}]; tasks: {', '.join(registry)}")
        registry[task] = _override(registry[task], table, str(path))
    return registry


def _override(entry: WeightsEntry, table: dict[str, Any], where: str) -> WeightsEntry:
    _check_keys(entry.task, table, where)
    if any(table.get(name, getattr(entry, name)) != getattr(entry, name) for name in _LOCATION_FIELDS):
        entry = replace(entry, sha256="", size=None, license=WeightsEntry.license, origin="")
    return replace(entry, **table)


def parse_spec(spec: str, task: str) -> Path | WeightsEntry:
    """`--weights` or `MPRNET_<TASK>_WEIGHTS`: a local path, or `hf://owner/repo/path/file[@revision]`."""
    if not spec.startswith(HF_SCHEME):
        return Path(spec).expanduser()
    location, _, revision = spec[len(HF_SCHEME) :].partition("@")
    owner, _, rest = location.partition("/")
    repo, _, filename = rest.partition("/")
    if not (owner and repo and filename) or "@" in revision:
        raise ConfigError(f"{spec!r}: expected hf://owner/repo/path/file.pth, optionally followed by @revision")
    return WeightsEntry(task=task, repo_id=f"{owner}/{repo}", filename=filename, revision=revision or "main")


def configured_source(task: str, spec: str | None = None) -> Path | WeightsEntry:
    """Where `task`'s checkpoint comes from: `spec`, else the environment variable, else the registry."""
    spec = spec or os.environ.get(env_variable(task))
    if spec:
        return parse_spec(spec, task)
    registry = load_registry()
    if task not in registry:
        raise ConfigError(f"no checkpoint is registered for {task!r}; tasks: {', '.join(registry)}")
    return registry[task]


# --- the cache, owned by huggingface_hub -----------------------------------------------


def cached_file(entry: WeightsEntry) -> Path | None:
    """The file in the hub cache for this entry, without any network access."""
    found = try_to_load_from_cache(entry.repo_id, entry.filename, revision=entry.revision)
    return Path(found) if isinstance(found, str) else None


def file_sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def resolve_checkpoint(task: str, spec: str | None = None, *, tqdm_class: type[tqdm] | None = None) -> Path:
    """The local checkpoint file for `task`, downloading and verifying it if needed."""
    source = configured_source(task, spec)
    if isinstance(source, Path):
        return source
    return fetch(source, tqdm_class=tqdm_class)


def fetch(entry: WeightsEntry, *, force: bool = False, tqdm_class: type[tqdm] | None = None) -> Path:
    """The verified cached file: no network when it is cached, one download when it is not.

    A file that fails a check stays where it is (it is the cache's, and may be evidence)
    but is refused on this and every later load, since each load checks it again.
    """
    path = None if force else cached_file(entry)
    if path is not None:
        check_file(entry, path, fresh=False)
        return path
    path = _download(entry, force, tqdm_class)
    check_file(entry, path, fresh=True)
    return path


def _download(entry: WeightsEntry, force: bool, tqdm_class: type[tqdm] | None) -> Path:
    if force and constants.is_offline_mode():
        raise WeightsUnavailableError(f"cannot download {entry.uri} again: HF_HUB_OFFLINE is set; unset it and retry")
    options: dict[str, Any] = dict(revision=entry.revision, endpoint=os.environ.get("HF_ENDPOINT"), force_download=force)
    try:
        plan = hf_hub_download(entry.repo_id, entry.filename, dry_run=True, **options)
        size = human_size(plan.file_size) if plan.file_size is not None else "size unknown"
        logger.info("downloading the %s checkpoint (%s) from %s", entry.task, size, entry.uri)
        logger.info("license: %s%s", entry.license, f"; original: {entry.origin}" if entry.origin else "")
        return Path(hf_hub_download(entry.repo_id, entry.filename, tqdm_class=tqdm_class, **options))
    except (OSError, httpx2.HTTPError) as error:
        raise _explain(entry, error) from error


# --- verification ------------------------------------------------------------------------


def check_file(entry: WeightsEntry, path: Path, *, fresh: bool) -> None:
    """Refuse `path` unless it matches the registry's sha256 or, lacking one, the first download's.

    A fresh download, or a file with no digest to compare against, is also checked to be an
    MPRNet for this task before its digest is trusted and recorded.
    """
    digest = file_sha256(path)
    expected, reference = expected_digest(entry)
    if expected and digest != expected:
        raise WeightsUnavailableError(
            f"{path} ({entry.uri}) has sha256 {digest}, but {reference} says {expected}: "
            + (
                f"download it again with `mprnet weights download {entry.task} --force`"
                if entry.sha256
                else f"the file changed since; if you trust the new one, delete its entry in {_records_path()}"
            )
        )
    if fresh or not expected:
        _check_architecture(entry, path)
    if not expected:
        _record_digest(entry, digest, path.stat().st_size)


def expected_digest(entry: WeightsEntry) -> tuple[str, str]:
    """The sha256 to compare against and where it comes from; empty when none is known yet."""
    if entry.sha256:
        return entry.sha256.lower(), "the weights registry"
    record = _read_records().get(entry.uri)
    if record is None:
        return "", ""
    return record["sha256"], f"the first download ({record['recorded']})"


def _check_architecture(entry: WeightsEntry, path: Path) -> None:
    # Imported here: torch is heavy and `mprnet weights list` never needs it.
    from mprnet_cli.checkpoints import build_model, read_state_dict

    try:
        build_model(read_state_dict(path), entry.uri, entry.task)
    except CheckpointError as error:
        widths = f"n_feat {entry.n_feat}, scale_unetfeats {entry.scale_unetfeats}, scale_orsnetfeats {entry.scale_orsnetfeats}"
        published = f" (the published one has {widths})" if entry.n_feat else ""
        raise WeightsUnavailableError(
            f"refusing {path}: {error.message}. Expected an MPRNet {entry.task} checkpoint{published}; "
            f"point {entry.task} at another file with --weights or {env_variable(entry.task)}"
        ) from error


def _records_path() -> Path:
    return state_dir() / "first-download-digests.json"


def _read_records() -> dict[str, dict[str, Any]]:
    path = _records_path()
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path} is corrupt ({error}): delete it to record digests afresh") from error


def _record_digest(entry: WeightsEntry, digest: str, size: int) -> None:
    """Remember the first download's digest (trust on first use); written atomically."""
    path = _records_path()
    records = _read_records()
    records[entry.uri] = {"sha256": digest, "size": size, "recorded": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(json.dumps(records, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(temporary, path)


@dataclass(frozen=True)
class Verification:
    """The outcome of re-hashing one cached checkpoint."""

    entry: WeightsEntry
    path: Path | None
    ok: bool
    detail: str


def verify_cached(entry: WeightsEntry) -> Verification:
    """Re-hash the cached file and compare, without downloading or recording anything."""
    path = cached_file(entry)
    if path is None:
        return Verification(entry, None, True, "not cached")
    digest = file_sha256(path)
    expected, reference = expected_digest(entry)
    if not expected:
        return Verification(entry, path, True, f"unchecked, sha256 {digest}: nothing to compare with yet (recorded on next use)")
    if digest != expected:
        return Verification(entry, path, False, f"FAILED, sha256 {digest} does not match {reference}: {expected}")
    return Verification(entry, path, True, f"ok, sha256 {digest} matches {reference}")


# --- errors --------------------------------------------------------------------------------


def _explain(entry: WeightsEntry, error: BaseException) -> WeightsUnavailableError:
    """One line that says what went wrong and what to do, for each way a download fails."""
    task, uri = entry.task, entry.uri
    retry = f"then run `mprnet weights download {task}`, or pass --weights PATH to a local copy"
    cause = error.__cause__ if isinstance(error, LocalEntryNotFoundError) and error.__cause__ else error
    status = cause.response.status_code if isinstance(cause, HfHubHTTPError) and cause.response is not None else None
    if isinstance(cause, OfflineModeIsEnabled) or constants.is_offline_mode():
        message = f"the {task} checkpoint is not in the cache and HF_HUB_OFFLINE is set: go online, unset HF_HUB_OFFLINE, {retry}"
    elif isinstance(cause, GatedRepoError):
        message = f"{entry.repo_id} is gated: accept its terms on the hub, set HF_TOKEN to your token, {retry}"
    elif isinstance(cause, RepositoryNotFoundError):
        message = f"repository {entry.repo_id} not found (or private: then set HF_TOKEN); check the source of {task} with `mprnet weights list`"
    elif isinstance(cause, RevisionNotFoundError):
        message = f"revision {entry.revision!r} not found in {entry.repo_id}; fix the revision of {task} (see `mprnet weights list`)"
    elif isinstance(cause, RemoteEntryNotFoundError):
        message = _missing_file_message(entry)
    elif status in (401, 403):
        message = f"the hub refused {uri} (HTTP {status}): set HF_TOKEN to a token that can read {entry.repo_id}, {retry}"
    elif status is not None and status >= 500:
        message = f"the hub failed to serve {uri} (HTTP {status}, a server-side problem): try again later, or pass --weights PATH"
    elif isinstance(cause, (httpx2.ConnectError, httpx2.TimeoutException, ConnectionError)):
        message = f"cannot reach the hub to download the {task} checkpoint, which is not cached: check your connection (and HF_ENDPOINT), {retry}"
    elif isinstance(cause, httpx2.HTTPError):
        message = f"the download of {uri} was cut off ({_first_line(cause)}); nothing was kept: run the command again"
    elif isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
        message = f"no space left while downloading {uri} into {constants.HF_HUB_CACHE}: free some space or set HF_HUB_CACHE to a larger disk"
    else:
        message = f"could not download {uri}: {_first_line(cause)}"
    return WeightsUnavailableError(message)


def _missing_file_message(entry: WeightsEntry) -> str:
    head = f"{entry.repo_id} (revision {entry.revision}) has no file {entry.filename!r}"
    fix = f"use one with {env_variable(entry.task)}=hf://{entry.repo_id}/FILE, or set filename in [{entry.task}] of {user_config_path()}"
    try:
        files = HfApi(endpoint=os.environ.get("HF_ENDPOINT")).list_repo_files(entry.repo_id, revision=entry.revision)
    except (OSError, httpx2.HTTPError) as error:
        return f"{head}, and listing its files failed ({_first_line(error)})"
    checkpoints = [name for name in files if name.lower().endswith(CHECKPOINT_SUFFIXES)]
    hinted = [name for name in checkpoints if any(hint in name.lower() for hint in FILENAME_HINTS.get(entry.task, ()))]
    if hinted:
        return f"{head}; files that look like the {entry.task} checkpoint: {', '.join(hinted)}; {fix}"
    if checkpoints:
        return f"{head}, and none of its checkpoint files ({', '.join(checkpoints)}) is named like a {entry.task} one; {fix}"
    return f"{head}, nor any other checkpoint file (*{', *'.join(CHECKPOINT_SUFFIXES)})"


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def human_size(size: int) -> str:
    """Decimal units, as the hub shows them: `2.6 MB`."""
    if size < 1000:
        return f"{size} bytes"
    value = size / 1000
    for unit in ("kB", "MB"):
        if value < 1000:
            return f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"
