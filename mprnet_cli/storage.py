"""Object-store paths (`s3://bucket/key`, `gs://`, `abfs://`, `memory://`...) through fsspec.

A URI keeps the spelling the user gave it: the stores' own listings name objects without
their protocol, so every name handed back is rebuilt from the URI it was asked about. A
folder on a store is a prefix: `s3://b/rainy` holds `s3://b/rainy/a.png`.

Credentials and endpoints come from each store's own environment variables and files
(AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS...). Whatever the
store or its client library raises becomes one `InputError` or `OutputError` naming the
URI: no such bucket, access denied and connection refused are a user's to fix.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mprnet_cli.errors import InputError, MprnetError, OutputError

logger = logging.getLogger("mprnet")

# Two letters at least, so that a Windows drive (`C:/photos`) is a local path.
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]+)://")
_GLOB_MAGIC = re.compile(r"[*?[]")

#: The pip extra that installs a protocol's package, where mprnet has one.
_EXTRAS = {"s3": "mprnet[s3]", "s3a": "mprnet[s3]"}


def is_uri(path: str) -> bool:
    """Whether `path` names an object on a store (`s3://b/x.png`) rather than a local file."""
    return _SCHEME.match(path) is not None


@dataclass(frozen=True)
class Listing:
    """The objects one listing found below `folder`, `depth` levels down (None: all), so
    that planning knows which outputs exist without asking the store about each."""

    folder: str
    depth: int | None
    files: frozenset[str]
    #: Whether anything is there: objects, or folders holding some deeper than `depth`.
    found: bool

    def covers(self, uri: str) -> bool:
        """Whether `uri` lies where this listing looked: its absence from `files` means it does not exist."""
        if not uri.startswith(self.folder + "/"):
            return False
        return self.depth is None or uri[len(self.folder) + 1:].count("/") < self.depth


def list_folder(uri: str, depth: int | None = None, error: type[MprnetError] = InputError) -> Listing:
    """Every object below the prefix `uri` (its own name, when `uri` is one object), in one
    listing. A prefix that holds nothing gives an empty listing; a missing bucket is an
    `error` (an input's, or an output's)."""
    folder = uri.rstrip("/")
    fs, path = _filesystem(folder, error)
    path = path.rstrip("/")
    with _store_errors(folder, "list", error):
        found = fs.find(path, maxdepth=depth, withdirs=depth is not None, detail=True)
        if not found and depth is not None:
            # A listing one level deep finds a missing bucket empty; a full listing of
            # nothing costs as little, and says so.
            fs.find(path)
    # `find` gives names without the protocol, as the store spells them: rebuild the user's.
    files = frozenset(folder if name.rstrip("/") == path else folder + name[len(path):]
                      for name, info in found.items() if info.get("type") != "directory" and name.startswith(path))
    return Listing(folder, depth, files, bool(found))


def glob(pattern: str, recursive: bool) -> tuple[Listing, list[str]]:
    """The objects a glob (a URI with `*`, `?` or `[` after its scheme) matches, sorted, and
    the listing of its literal leading folders they were found in (as deep as the pattern
    reaches; `**` only when `recursive`)."""
    from fsspec.utils import glob_translate

    scheme, path = pattern.split("://", 1)
    parts = path.split("/")
    literal = next(index for index, part in enumerate(parts) if _GLOB_MAGIC.search(part))
    if literal == 0:
        raise InputError(f"{pattern}: a pattern cannot match bucket names; name the bucket")
    rest = "/".join(parts[literal:])
    if not recursive:
        rest = re.sub(r"\*\*+", "*", rest)
    listing = list_folder(f"{scheme}://" + "/".join(parts[:literal]), None if "**" in rest else len(parts) - literal)
    matcher = re.compile(glob_translate(rest))
    start = len(listing.folder) + 1
    return listing, sorted(uri for uri in listing.files if matcher.match(uri[start:]))


def read_bytes(uri: str) -> bytes:
    """The whole object, in one GET."""
    fs, path = _filesystem(uri, InputError)
    with _store_errors(uri, "read", InputError):
        return fs.cat_file(path)


def write_bytes(uri: str, data: bytes) -> None:
    """One PUT of the whole object: a store shows the old object or the whole new one,
    never a part, so no temporary name is needed."""
    fs, path = _filesystem(uri, OutputError)
    with _store_errors(uri, "write", OutputError):
        fs.pipe_file(path, data)


def exists(uri: str) -> bool:
    """Whether an object is at `uri` (one HEAD): for outputs no listing covers."""
    fs, path = _filesystem(uri, OutputError)
    with _store_errors(uri, "look up", OutputError):
        return fs.isfile(path)


def download(uri: str, local: Path) -> None:
    """Copy an object to a local file, streaming (a clip does not fit in memory)."""
    fs, path = _filesystem(uri, InputError)
    with _store_errors(uri, "read", InputError):
        fs.get_file(path, str(local))


def upload(local: Path, uri: str) -> None:
    """Copy a finished local file to `uri`; the object appears only once it is whole (a
    large one goes up in parts that the store joins at the end)."""
    fs, path = _filesystem(uri, OutputError)
    with _store_errors(uri, "write", OutputError):
        fs.put_file(str(local), path)


def _filesystem(uri: str, error: type[MprnetError]) -> tuple[Any, str]:
    """The fsspec file system for `uri` and the path on it; a protocol whose package is
    missing (s3fs, gcsfs, adlfs...) says which to install."""
    import fsspec
    from fsspec.registry import known_implementations

    protocol = uri.split("://", 1)[0].lower()
    try:
        return fsspec.url_to_fs(uri)
    except ImportError:
        package = known_implementations.get(protocol, {}).get("class", "").split(".")[0] or "its fsspec package"
        direction = "writing" if issubclass(error, OutputError) else "reading"
        raise error(f"{uri}: {direction} {protocol}:// needs {package} "
                    f"(pip install '{_EXTRAS.get(protocol, package)}')") from None
    except ValueError as problem:  # an unknown protocol, or a URL its file system refuses
        raise error(f"{uri}: not a path mprnet can use ({problem})") from None


@contextlib.contextmanager
def _store_errors(uri: str, verb: str, error: type[MprnetError]) -> Iterator[None]:
    """What the store or its client library raises, as one line naming `uri`."""
    try:
        yield
    except MprnetError:
        raise
    except FileNotFoundError as problem:  # s3fs names the key alone, or says which bucket is missing
        reason = _reason(problem)
        detail = "" if reason.rstrip("/") in uri else f" ({reason})"
        raise error(f"{uri}: no such object or bucket{detail}") from None
    except PermissionError as problem:
        raise error(f"{uri}: access denied ({_reason(problem)})") from None
    except Exception as problem:  # the client libraries' own types (botocore's, google's...)
        logger.debug("%s %s failed", verb, uri, exc_info=True)
        raise error(f"{uri}: cannot {verb} ({type(problem).__name__}: {_reason(problem)})") from None


def _reason(problem: BaseException) -> str:
    """The library's message on one line (some end theirs with a newline and details)."""
    text = getattr(problem, "strerror", None) or str(problem) or type(problem).__name__
    return " ".join(text.split())

