"""From command-line intent to restored files: plan the jobs, load the model once, run.

Nothing here prints: results come back as values and problems as `MprnetError`s, so the
CLI decides what the user sees. `-` stands for standard input or output.

A batch runs as three stages joined by small bounded queues: a reader thread decodes
the next images, the calling thread runs the network, and a writer thread encodes and
writes finished ones. Decoding and encoding hide behind compute, and memory stays flat
however many files there are.

Video clips (known by their extension) are planned, named, skipped and reported like
images, and each is restored in its own streaming pass by `mprnet_cli.video`. A
clip's output stays a clip: `--ext` with an image format re-formats the images of a
batch and leaves its clips in their own containers; `--ext` with a video container
(mkv, mp4...) re-muxes the clips and leaves the images alone.

Inputs and outputs may be object-store URIs (`s3://bucket/prefix`, see `mprnet_cli.storage`)
under the same rules: planning lists each place once and reads no object; an image is
read in one GET and written in one PUT, a clip through local temporary copies.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import logging
import os
import queue
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePath, PurePosixPath
from typing import BinaryIO

from mprnet_cli import storage
from mprnet_cli.devices import resolve_device, resolve_precision
from mprnet_cli.errors import InputError, MprnetError, OutputError
from mprnet_cli.imageio import (FORMATS, Picture, decode_image, encode_image, format_for, opens_as_an_image, read_image,
                                readable_extensions, write_atomic)
from mprnet_cli.model.restorer import Progress, Restorer
from mprnet_cli.tiling import DEFAULT_BLEND, DEFAULT_OVERLAP
from mprnet_cli.video import CONTAINERS, PIPE_CONTAINERS, Encoding, FrameProgress, Span, is_video_path
from mprnet_cli.weights import resolve_checkpoint

STDIO = "-"

logger = logging.getLogger("mprnet")

TASK_SUFFIXES = {"deblur": "_deblurred", "derain": "_derained", "denoise": "_denoised"}

#: The format written to stdout, and next to an input whose own format cannot be written.
DEFAULT_EXTENSION = ".png"

#: Images decoded ahead of the network, and restored images waiting to be written.
QUEUE_DEPTH = 2
#: How long, as a share of an image's compute time, the loop waits for that image to be
#: written before it starts the next, so that its line and count appear on time.
WRITE_WAIT_SHARE = 0.05


@dataclass(frozen=True)
class Job:
    """One image or clip to restore: paths or store URIs (kept as written: `Path` would
    make `s3://` `s3:/`), or `-` for stdin/stdout."""

    source: str
    target: str
    #: For a clip, the output container's extension (`.mp4`); None for an image.
    video: str | None = None


@dataclass(frozen=True)
class Plan:
    jobs: list[Job]
    #: (path, reason) for inputs left out before any work: hidden, not images, already done.
    skipped: list[tuple[str, str]] = field(default_factory=list)
    #: A directory, a glob or several inputs: its failures are the batch's exit code 1.
    batch: bool = False
    #: Jobs of a folder or glob whose output name another input would also have had: these
    #: keep their source extension in it (`a.jp2` -> `a.jp2.png` beside `a.j2k.png`).
    renamed: list[Job] = field(default_factory=list)


@dataclass(frozen=True)
class Outcome:
    job: Job
    error: MprnetError | None = None
    megapixels: float = 0.0
    seconds: float = 0.0
    #: Time the network spent on this image (the rest is decoding, encoding and waiting).
    compute_seconds: float = 0.0
    #: For a clip: frames written, and the seconds of video they last.
    frames: int = 0
    duration: float = 0.0
    #: The Ray node that restored it (`--ray`); empty in a local batch.
    node: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class OutputNaming:
    """How output names are made: `-o` (a file, a directory, `-` or None), suffix, extension."""

    task: str
    output: str | None = None
    suffix: str | None = None
    extension: str | None = None
    overwrite: bool = False
    recursive: bool = False


def _looks_like_an_image(source: str, image_extensions: set[str]) -> bool:
    """Known image and video extensions are taken on trust (a broken one fails visibly
    later); any other local file is sniffed, so an image is known by its content. A store's
    objects are not: planning never downloads them."""
    extension = _pure(source).suffix.lower()
    if extension in image_extensions or extension in CONTAINERS:
        return True
    return not storage.is_uri(source) and opens_as_an_image(Path(source))


def _pure(location: str) -> PurePath:
    """A path or URI for its name, stem and suffix only (`Path` would make `s3://` `s3:/`)."""
    return PurePosixPath(location) if storage.is_uri(location) else Path(location)


def _identity(location: str) -> str:
    """What two names of one file share: the resolved path, or a URI as written."""
    return location if storage.is_uri(location) else str(Path(location).resolve())


def _beside(source: str, name: str) -> str:
    if storage.is_uri(source):
        return source.rsplit("/", 1)[0] + "/" + name
    return str(Path(source).with_name(name))


def _inside(directory: str, folder: PurePath, name: str) -> str:
    if storage.is_uri(directory):
        return "/".join([directory.rstrip("/"), *folder.parts, name])
    return str(Path(directory) / folder / name)


def _is_hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _expand(argument: str, recursive: bool, listings: list[storage.Listing]) -> list[tuple[str, PurePath]] | None:
    """(file, path relative to the argument's root) for a directory or a glob; None for a plain path."""
    if storage.is_uri(argument):
        return _expand_uri(argument, recursive, listings)
    path = Path(argument)
    if path.is_dir():
        pattern = "**/*" if recursive else "*"
        return [(str(p), p.relative_to(path)) for p in sorted(path.glob(pattern)) if p.is_file() or _is_broken_link(p)]
    if glob.has_magic(argument) and not path.exists():  # `photo[1].png` that exists is that file
        # Mirror structure below the pattern's literal leading folders: `shots/*/x.png` -> `<day>/x.png`.
        literal = []
        for part in path.parts:
            if glob.has_magic(part):
                break
            literal.append(part)
        root = Path(*literal) if literal else Path()
        matches = sorted(Path(p) for p in glob.glob(argument, recursive=recursive))
        return [(str(p), p.relative_to(root)) for p in matches if p.is_file() or _is_broken_link(p)]
    return None


def _expand_uri(argument: str, recursive: bool, listings: list[storage.Listing]) -> list[tuple[str, PurePath]] | None:
    """As `_expand`, for a store, in one listing: a prefix is a folder, and a glob lists its
    literal leading folders as deep as its pattern reaches. Recorded in `listings`, which
    then say which outputs beside the inputs exist."""
    if glob.has_magic(argument.split("://", 1)[1]):
        listing, matches = storage.glob(argument, recursive)
    else:
        listing = storage.list_folder(argument, None if recursive else 1)
        if not listing.found:
            raise InputError(f"{argument}: no such file or directory")
        if listing.files == {listing.folder}:  # one object, named
            return None
        matches = sorted(listing.files)
    listings.append(listing)
    return [(uri, PurePosixPath(uri[len(listing.folder) + 1:])) for uri in matches]


def _is_broken_link(path: Path) -> bool:
    return path.is_symlink() and not path.exists()


def default_target(source: Path, task: str) -> Path:
    """`photo.jpg` -> `photo_deblurred.jpg`, beside the input; never the input itself."""
    return source.with_name(f"{source.stem}{TASK_SUFFIXES[task]}{_own_extension(source)}")


def _own_extension(source: PurePath) -> str:
    """An image keeps its format where we write it, a clip its container."""
    return source.suffix if source.suffix.lower() in FORMATS or is_video_path(source) else DEFAULT_EXTENSION


def _extension_for(source: PurePath, naming: OutputNaming) -> str:
    """`--ext` applies to inputs of its own kind: an image format to images, a container to clips."""
    if naming.extension and (naming.extension in CONTAINERS) == is_video_path(source):
        return naming.extension
    return _own_extension(source)


def normalise_extension(extension: str | None) -> str | None:
    """`--ext png`, `--ext .PNG` -> `.png`; None or `auto` keeps each input's own format."""
    if extension is None or extension.lower() == "auto":
        return None
    extension = "." + extension.lower().lstrip(".")
    if extension not in FORMATS and extension not in CONTAINERS:
        raise OutputError(f"--ext {extension[1:]}: not a format mprnet writes; use one of "
                          f"{', '.join(sorted(e[1:] for e in FORMATS))} for images, "
                          f"{', '.join(e[1:] for e in CONTAINERS)} for videos")
    return extension


def plan_jobs(inputs: list[str], naming: OutputNaming) -> Plan:
    """Pair each input with its output, checking everything that can be checked before work starts."""
    try:
        return _plan(inputs, naming)
    except OSError as error:  # a folder on the way that may not be looked into, say
        raise MprnetError(f"{error.filename or 'a path'}: {error.strerror or error}") from None


def _plan(inputs: list[str], naming: OutputNaming) -> Plan:
    if not inputs:
        raise InputError("no input given")
    if STDIO in inputs and len(inputs) > 1:
        raise InputError("`-` (standard input) cannot be mixed with other inputs")
    if inputs == [STDIO]:
        target = naming.output or STDIO
        # A clip on standard input is announced by its output: --ext mkv, or -o clip.mkv.
        video = naming.extension in CONTAINERS or (target != STDIO and is_video_path(target))
        if target != STDIO:
            if target.endswith(("/", os.sep)) or (not storage.is_uri(target) and Path(target).is_dir()):
                raise OutputError(f"{target}: one image from standard input needs an output file name, or -o -")
            _named_output(naming, video)
            if not storage.is_uri(target):
                _check_writable(Path(target).parent, set())
        return Plan([Job(STDIO, target, _container(target, naming) if video else None)])

    listings: list[storage.Listing] = []  # what the store listings saw, inputs' and outputs'
    sources, named, skipped, batch = _collect_sources(inputs, naming.recursive, listings)
    if not sources:
        raise InputError("no images or videos found in " + ", ".join(inputs) + (" (hidden and non-image files are skipped)" if skipped else ""))
    directory = _output_directory(naming.output, batch, listings)
    if naming.output == STDIO and (batch or len(sources) > 1):
        raise OutputError("-o - writes one image to standard output; give one input, or an output directory")

    targets = [_target_for(source, relative, directory, naming) for source, relative in sources]
    renamed = _keep_source_extensions(sources, named, targets, directory, naming)
    videos = [_container(target, naming) if is_video_path(source) else None for (source, _), target in zip(sources, targets)]
    identities = [None if target == STDIO else _identity(target) for target in targets]
    # A folder restored before holds its outputs beside their inputs: those are results, not inputs.
    produced_by = {identity: source for (source, _), identity in zip(sources, identities) if identity}
    jobs, renamed_jobs, seen, writable = [], [], {}, set()
    for index, ((source, _), target, identity, video) in enumerate(zip(sources, targets, identities, videos)):
        if index in renamed:
            renamed_jobs.append(Job(source, target, video))
        source_identity = _identity(source)
        maker = produced_by.get(source_identity)
        if maker is not None and maker != source:
            skipped.append((source, f"it is the output of {maker}"))
            continue
        if identity is not None:
            if identity == source_identity:
                raise OutputError(f"{target}: refusing to overwrite the input; choose another output name or --suffix")
            if identity in seen:
                raise OutputError(f"{seen[identity]} and {source} would both be written to {target}; "
                                  "rename one, or restore them in separate runs")
            seen[identity] = source
            if not storage.is_uri(target) and Path(target).is_dir():
                raise OutputError(f"{target}: is a directory; give a file name")
            if not naming.overwrite and _exists(target, listings):
                skipped.append((source, f"{target} exists (use --overwrite to redo it)"))
                continue
            if not storage.is_uri(target):
                _check_writable(Path(target).parent, writable)
        jobs.append(Job(source, target, video))
    return Plan(jobs, skipped, batch, renamed_jobs)


def _exists(target: str, listings: list[storage.Listing]) -> bool:
    """Whether an output is there already; on a store, as the planning's listings saw it,
    and only where none looked, by asking the store."""
    if not storage.is_uri(target):
        return Path(target).exists()
    for listing in listings:
        if listing.covers(target):
            return target in listing.files
    return storage.exists(target)


def _keep_source_extensions(sources: list[tuple[str, PurePath]], named: set[str], targets: list[str],
                            directory: str | None, naming: OutputNaming) -> set[int]:
    """Rename, in `targets`, the outputs that found files would share (`a.jp2` and `a.j2k`
    both to `a.png`): each keeps its source extension (`a.jp2.png`, `a.j2k.png`), so a whole
    folder is not refused for one clash. Every file of a clash is renamed, the one whose
    format is kept too: an earlier run's `a.png`, made when the folder held `a.jp2` alone,
    is then never taken for the new `a.png`'s result. Files named on the command line keep
    their names, and files of the same name (from two folders) cannot be told apart by
    it: such clashes are refused later. Returns the indices renamed."""
    groups: dict[str, list[int]] = defaultdict(list)
    for index, target in enumerate(targets):
        if target != STDIO:
            groups[_identity(target)].append(index)
    renamed = set()
    for indices in groups.values():
        if len(indices) < 2 or len({_pure(sources[i][0]).name for i in indices}) < len(indices):
            continue
        for index in indices:
            source, relative = sources[index]
            if source not in named:
                targets[index] = _target_for(source, relative, directory, naming, keep_extension=True)
                renamed.add(index)
    return renamed


def _check_writable(directory: Path, checked: set[Path]) -> None:
    """Refuse an output directory that cannot be made or written before any image is
    computed; the write itself still reports what this cannot foresee."""
    missing = _missing_folders(directory)
    existing = missing[-1].parent if missing else directory
    if existing in checked:
        return
    checked.add(existing)
    if not existing.is_dir():
        raise OutputError(f"{existing}: is a file, so no output directory can be made there")
    if os.access(existing, os.W_OK | os.X_OK):
        return
    try:  # os.access only advises (network and FUSE file systems can say no and still allow it)
        descriptor, probe = tempfile.mkstemp(dir=existing, prefix=".mprnet-probe-")
    except OSError as error:
        raise OutputError(f"{existing}: cannot write there ({error.strerror or error})") from None
    os.close(descriptor)
    os.unlink(probe)


def list_images(argument: str) -> list[tuple[Path, PurePath]]:
    """(image file, its path relative to `argument`) for a local folder (walked recursively),
    a glob or one file; hidden, broken and non-image files left out, as a batch leaves them."""
    return [(Path(source), relative) for source, relative in _collect_sources([argument], True, [])[0]
            if not is_video_path(source)]


def _collect_sources(
    inputs: list[str], recursive: bool, listings: list[storage.Listing],
) -> tuple[list[tuple[str, PurePath]], set[str], list[tuple[str, str]], bool]:
    """All image files named by `inputs`, with their relative paths; those of them named
    on the command line; what was skipped; and whether this is a batch (a directory, a
    glob or several inputs). The store listings made on the way are added to `listings`."""
    image_extensions = readable_extensions()
    sources: list[tuple[str, PurePath]] = []
    skipped: list[tuple[str, str]] = []
    named: set[str] = set()  # identities, to find a file named twice
    named_sources: set[str] = set()
    batch = len(inputs) > 1
    for argument in inputs:
        expanded = _expand(argument, recursive, listings)
        if expanded is None:
            if not storage.is_uri(argument) and not Path(argument).exists():  # a URI's listing found it
                raise InputError(f"{argument}: no such file or directory")
            source = argument if storage.is_uri(argument) else str(Path(argument))
            identity = _identity(source)
            if identity in named:
                skipped.append((source, "named more than once"))
            else:
                named.add(identity)
                named_sources.add(source)
                sources.append((source, PurePath(_pure(source).name)))
            continue
        batch = True
        # A glob leaves hidden files out itself unless its pattern asks for them (`.*`); a
        # store's glob matches them, and leaves them out here as a folder does.
        in_directory = storage.is_uri(argument) or Path(argument).is_dir()
        for source, relative in expanded:
            if relative.is_absolute() or ".." in relative.parts:  # a store's key, `in//a.png` or `in/../a.png`
                skipped.append((source, "an empty or `..` part in its name, which no folder can mirror"))
            elif in_directory and _is_hidden(relative):
                skipped.append((source, "hidden"))
            elif not storage.is_uri(source) and _is_broken_link(Path(source)):
                skipped.append((source, "a broken link"))
            elif not _looks_like_an_image(source, image_extensions):
                skipped.append((source, "not an image"))
            else:
                sources.append((source, relative))
    return sources, named_sources, skipped, batch


def _output_directory(output: str | None, batch: bool, listings: list[storage.Listing]) -> str | None:
    """The directory outputs go into, or None for 'beside each input' / a single named file."""
    if output is None or output == STDIO:
        return None
    if storage.is_uri(output):
        return _output_prefix(output, batch, listings)
    path = Path(output)
    if batch or path.is_dir() or output.endswith(("/", os.sep)):
        if path.exists() and not path.is_dir():
            raise OutputError(f"{output}: is a file; with several inputs or a directory, -o must be a directory")
        if not path.exists() and _looks_like_a_file(output):
            raise OutputError(_NOT_A_DIRECTORY.format(output=output))
        return str(path)
    return None


_NOT_A_DIRECTORY = ("{output}: several inputs need an output directory, not a file name "
                    "(for a directory of that name, write {output}/)")


def _looks_like_a_file(output: str) -> bool:
    extension = _pure(output).suffix.lower()
    return (extension in FORMATS or extension in CONTAINERS) and not output.endswith(("/", os.sep))


def _output_prefix(output: str, batch: bool, listings: list[storage.Listing]) -> str | None:
    """`_output_directory` on a store, where a folder is a prefix that holds objects, or one
    the user marks with `/`; its one listing says which outputs exist."""
    if not batch and _looks_like_a_file(output):
        return None  # one image, to an object of that name
    listing = storage.list_folder(output, error=OutputError)
    holds_objects = bool(listing.files - {listing.folder})
    if not (batch or holds_objects or output.endswith("/")):
        return None
    if _looks_like_a_file(output) and not holds_objects:
        raise OutputError(_NOT_A_DIRECTORY.format(output=output))
    listings.append(listing)
    return listing.folder


def _target_for(source: str, relative: PurePath, directory: str | None, naming: OutputNaming,
                keep_extension: bool = False) -> str:
    if naming.output == STDIO:
        return STDIO
    if directory is None and naming.output is not None:
        return _named_output(naming, is_video_path(source))
    suffix = naming.suffix if naming.suffix is not None else ("" if directory else TASK_SUFFIXES[naming.task])
    pure = _pure(source)
    name = f"{pure.name if keep_extension else pure.stem}{suffix}{_extension_for(pure, naming)}"
    if directory is None:
        return _beside(source, name)
    return _inside(directory, relative.parent, name)


def check_device_options(device: str, precision: str) -> None:
    """Raise DeviceError for a device or precision that cannot run here, before any planning."""
    resolve_precision(precision, resolve_device(device))


def _named_output(naming: OutputNaming, video: bool) -> str:
    """`-o FILE`, checked: a format it names, of the input's kind (image or clip), and no
    `--ext` of that kind that says otherwise."""
    output = str(naming.output)
    extension = Path(output).suffix.lower()
    if video:
        if extension not in CONTAINERS:
            raise OutputError(f"{output}: a video is written as a video; use one of {', '.join(CONTAINERS)}")
        contradicts = naming.extension in CONTAINERS and CONTAINERS[naming.extension] != CONTAINERS[extension]
    else:
        if extension in CONTAINERS:
            raise OutputError(f"{output}: an image cannot be written as a video; give an image file name")
        fmt = format_for(output)
        contradicts = naming.extension in FORMATS and FORMATS[naming.extension] != fmt
    if contradicts:
        raise OutputError(f"--ext {naming.extension.lstrip('.')} contradicts -o {output}; drop one of them")
    return output


def _container(target: str, naming: OutputNaming) -> str:
    """A clip's output container: its file's extension, or for stdout `--ext`, which must stream."""
    if target != STDIO:
        return Path(target).suffix.lower()
    if naming.extension not in PIPE_CONTAINERS:
        raise OutputError("-o -: a video on standard output needs --ext mkv or --ext ts "
                          "(mp4 and the others seek back to finish the file)")
    return naming.extension


def load_restorer(
    task: str,
    weights: str | None,
    device: str,
    precision: str,
    *,
    tile: int | None = None,
    tile_overlap: int = DEFAULT_OVERLAP,
    tile_blend: str = DEFAULT_BLEND,
    tlc_train_size: int | None = None,
    ensemble: int = 1,
    progress_bar: type | None = None,
) -> Restorer:
    """Resolve the device first (cheap, and the likelier mistake), then the checkpoint:
    `weights` (a path or hf:// spec) or, when None, the task's registered one, downloaded
    once with `progress_bar` as huggingface_hub's tqdm class (None: its own, on stderr)."""
    resolved = resolve_device(device)
    checkpoint = resolve_checkpoint(task, weights, tqdm_class=progress_bar)
    return Restorer.from_checkpoint(checkpoint, task, device=resolved, precision=precision, tile=tile,
                                    tile_overlap=tile_overlap, tile_blend=tile_blend, tlc_train_size=tlc_train_size,
                                    ensemble=ensemble)


def checked_checkpoint(task: str, weights: str | None, progress_bar: type | None = None) -> Path:
    """The checkpoint a cluster's workers will load: resolved (downloaded, verified) and
    loaded once here, so that a wrong file is one error before any worker starts."""
    from mprnet_cli.checkpoints import load_model

    path = resolve_checkpoint(task, weights, tqdm_class=progress_bar)
    load_model(path, task)
    return path


def restore_picture(restorer: Restorer, picture: Picture, progress: Progress | None = None) -> Picture:
    return picture.with_pixels(restorer.restore_array(picture.pixels, progress))


def read_source(source: str, max_pixels: int | None) -> Picture:
    """Decode one job's image: standard input (`-`), a file, or a store's object (`s3://...`).
    Raises `InputError` with the source's name for anything that goes wrong."""
    if source == STDIO:
        if sys.stdin is None:  # started with `<&-`
            raise InputError("-: standard input is closed")
        return decode_image(sys.stdin.buffer.read(), "stdin", max_pixels)
    if storage.is_uri(source):
        return decode_image(storage.read_bytes(source), source, max_pixels)
    return read_image(Path(source), max_pixels)


def write_target(picture: Picture, target: str, stdout_format: str, quality: int) -> None:
    """Encode one job's image by its target's extension (`stdout_format` for `-`) and write
    it whole: a file through a temporary name, with the folders it needs; a store's object
    in one PUT. Raises `OutputError` with the target's name; a failed write leaves nothing."""
    to_stdout = target == STDIO
    fmt = stdout_format if to_stdout else format_for(target)
    label = "stdout" if to_stdout else target
    try:
        data = encode_image(picture, fmt, quality, label)
    except (OSError, ValueError) as error:  # Pillow's encoders: size limits, unsupported modes
        raise OutputError(f"{label}: cannot encode as {fmt} ({error})") from None
    if to_stdout:
        _write_stdout(data)
        return
    if storage.is_uri(target):
        storage.write_bytes(target, data)
        return
    path = Path(target)
    with _folders_for(path):
        write_atomic(path, data)


@contextlib.contextmanager
def _folders_for(path: Path) -> Iterator[None]:
    """Make the folders `path` needs; if the block fails, remove those it made."""
    made: list[Path] = []
    try:
        made = _missing_folders(path.parent)
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # looking for or making the folders
        _remove_if_empty(made)
        raise OutputError(f"{path.parent}: cannot create the output directory ({error.strerror or error})") from None
    try:
        yield
    except BaseException:
        _remove_if_empty(made)
        raise


def _missing_folders(directory: Path) -> list[Path]:
    """`directory` and the folders above it that do not exist yet, deepest first."""
    missing = []
    while not directory.exists() and directory != directory.parent:
        missing.append(directory)
        directory = directory.parent
    return missing


def _remove_if_empty(folders: list[Path]) -> None:
    """A write that failed leaves no folders it made for itself (one that another image
    wrote into since is not empty, and stays)."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _write_stdout(data: bytes) -> None:
    if sys.stdout is None:
        raise OutputError("standard output is closed; give -o a file or a directory")
    try:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    except OSError as error:
        if isinstance(error, BrokenPipeError):
            raise OutputError("stdout: the reading end of the pipe closed before the image was written") from None
        raise OutputError(f"stdout: cannot write ({error.strerror or error})") from None


_DONE = object()


@dataclass
class _Decoded:
    job: Job
    picture: Picture | None = None
    error: MprnetError | None = None
    read_seconds: float = 0.0
    #: Set as the network takes the image up, less its reading time: an image's reported
    #: time leaves out its wait in the queue.
    started: float = 0.0


class _Stages:
    """The reader and writer threads around the caller's compute loop."""

    def __init__(self, jobs: list[Job], quality: int, max_pixels: int | None, stdout_format: str) -> None:
        self.stop = threading.Event()
        self.decoded: queue.Queue[object] = queue.Queue(QUEUE_DEPTH)
        self.to_write: queue.Queue[object] = queue.Queue(QUEUE_DEPTH)
        self.finished: queue.Queue[Outcome] = queue.Queue()
        self._jobs, self._quality, self._max_pixels, self._stdout_format = jobs, quality, max_pixels, stdout_format
        self._closed = False
        self.reader = threading.Thread(target=self._read_all, name="mprnet-reader", daemon=True)
        self.writer = threading.Thread(target=self._write_all, name="mprnet-writer", daemon=True)
        self.reader.start()
        self.writer.start()

    def _put(self, target: queue.Queue[object], item: object) -> bool:
        while not self.stop.is_set():
            try:
                target.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _read_all(self) -> None:
        for job in self._jobs:
            item, reading = _Decoded(job), time.perf_counter()
            try:
                item.picture = read_source(job.source, self._max_pixels)
            except MprnetError as error:
                item.error = error
            except Exception as error:  # a dead reader would stall the batch; keep it per image
                logger.debug("reading %s failed", job.source, exc_info=True)
                item.error = InputError(f"{job.source}: cannot read ({type(error).__name__}: {error})")
            item.read_seconds = time.perf_counter() - reading
            if not self._put(self.decoded, item):
                return
        self._put(self.decoded, _DONE)

    def _write_all(self) -> None:
        while True:
            item = self.to_write.get()
            if item is _DONE:
                return
            decoded, restored, compute_seconds = item  # type: ignore[misc]
            try:
                write_target(restored, decoded.job.target, self._stdout_format, self._quality)
            except Exception as error:  # a dead writer would stall the batch; keep it per image
                if not isinstance(error, MprnetError):
                    logger.debug("writing %s failed", decoded.job.target, exc_info=True)
                    error = OutputError(f"{decoded.job.target}: cannot write ({type(error).__name__}: {error})")
                self.finished.put(Outcome(decoded.job, error=error, seconds=time.perf_counter() - decoded.started))
                continue
            height, width = restored.pixels.shape[:2]
            self.finished.put(
                Outcome(decoded.job, megapixels=height * width / 1e6, seconds=time.perf_counter() - decoded.started,
                        compute_seconds=compute_seconds)
            )

    def drain_finished(self, wait: float = 0.0) -> Iterator[Outcome]:
        """The outcomes written so far; with `wait`, give the writer up to that many
        seconds to deliver the first."""
        if wait > 0:
            try:
                yield self.finished.get(timeout=wait)
            except queue.Empty:
                return
        while True:
            try:
                yield self.finished.get_nowait()
            except queue.Empty:
                return

    def close(self) -> None:
        """Stop reading, let the writer finish what is already restored, and wait for it."""
        if self._closed:
            return
        self._closed = True
        self.stop.set()
        self.to_write.put(_DONE)  # the writer takes it: it ends only there (it keeps every error per image)
        self.writer.join()


def run_jobs(
    restorer: Restorer,
    jobs: list[Job],
    *,
    quality: int = 95,
    max_pixels: int | None = None,
    stdout_format: str = "PNG",
    encoding: Encoding = Encoding(),
    span: Span = Span(),
    resume: bool = False,
    on_start: Callable[[Job], None] | None = None,
    on_tiles: Progress | None = None,
    on_frames: FrameProgress | None = None,
) -> Iterator[Outcome]:
    """Restore every job in order, yielding one `Outcome` per job as each is written.

    `on_start(job)` is called as a job reaches the network, `on_tiles(done, total)` as the
    tiles of a tiled image finish, and `on_frames(done, total)` as a clip's frames do.
    Clips are encoded as `encoding` says, and only their `span`; `resume` keeps each clip's
    finished segments for a rerun (`mprnet_cli.video.restore_video`).

    Errors stay per job. If the caller stops early (an exception, an interrupt, or simply
    not iterating further), images already restored are still written completely, and
    nothing is left half-written (an interrupted clip is not written at all).
    """
    for is_video, group in itertools.groupby(jobs, key=lambda job: job.video is not None):
        if is_video:
            for job in group:
                yield restore_clip(restorer, job, encoding, span, resume, on_start, on_frames)
        else:
            yield from _run_images(restorer, list(group), quality, max_pixels, stdout_format, on_start, on_tiles)


def restore_clip(restorer: Restorer, job: Job, encoding: Encoding, span: Span, resume: bool = False,
                 on_start: Callable[[Job], None] | None = None, on_frames: FrameProgress | None = None) -> Outcome:
    """One clip, start to end, as an `Outcome`; an interrupt leaves no output and goes on up."""
    from mprnet_cli import video

    started = time.perf_counter()
    if on_start is not None:
        on_start(job)
    try:
        if job.source == STDIO and sys.stdin is None:
            raise InputError("-: standard input is closed")
        if job.target == STDIO and sys.stdout is None:
            raise OutputError("standard output is closed; give -o a file or a directory")
        with _clip_files(job) as (source, target):
            summary = video.restore_video(restorer, source, target, container=job.video, encoding=encoding,
                                          span=span, progress=on_frames,
                                          source_label=None if job.source == STDIO else job.source,
                                          target_label=None if job.target == STDIO else job.target,
                                          resume=resume and _resumable(job))
    except MprnetError as error:
        return Outcome(job, error=error, seconds=time.perf_counter() - started)
    except Exception as error:  # keep it per clip, as images do
        logger.debug("restoring %s failed", job.source, exc_info=True)
        error = MprnetError(f"{job.source}: cannot restore ({type(error).__name__}: {error})")
        return Outcome(job, error=error, seconds=time.perf_counter() - started)
    problem = None
    if summary.damaged:
        where = "stdout" if job.target == STDIO else job.target
        problem = InputError(f"{job.source}: {summary.damaged} frame(s) damaged or missing; what decoded "
                             f"({summary.frames} frames) is restored in {where}", exit_code=1)
    return Outcome(job, error=problem, megapixels=summary.frames * summary.width * summary.height / 1e6,
                   seconds=summary.seconds, compute_seconds=summary.compute_seconds, frames=summary.frames,
                   duration=summary.duration)


def _resumable(job: Job) -> bool:
    """--resume keeps a clip's segments beside a local output, from a local input; a clip
    on an object store is restored in one pass (its local copies last only the run)."""
    if storage.is_uri(job.source) or storage.is_uri(job.target):
        logger.warning("%s: on an object store, so restored in one pass (--resume needs local files)", job.source)
        return False
    return True


@contextlib.contextmanager
def _clip_files(job: Job) -> Iterator[tuple[str | BinaryIO, str | BinaryIO]]:
    """Where a clip is read and written: standard input and output, local files, or for a
    store's objects local copies (a clip is decoded and muxed with seeks, which a store
    does not offer): the source downloaded first, the result uploaded whole at the end,
    and neither if the block fails."""
    source: str | BinaryIO = sys.stdin.buffer if job.source == STDIO else job.source
    target: str | BinaryIO = sys.stdout.buffer if job.target == STDIO else job.target
    remote_source, remote_target = storage.is_uri(job.source), storage.is_uri(job.target)
    with contextlib.ExitStack() as stack:
        if remote_source or remote_target:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mprnet-clip-")))
        if remote_source:
            source = str(folder / f"source{_pure(job.source).suffix}")
            storage.download(job.source, Path(source))
        if remote_target:
            target = str(folder / f"restored{job.video}")
        elif job.target != STDIO:
            stack.enter_context(_folders_for(Path(job.target)))
        yield source, target
        if remote_target:
            storage.upload(Path(target), job.target)


def _run_images(restorer: Restorer, jobs: list[Job], quality: int, max_pixels: int | None, stdout_format: str,
                on_start: Callable[[Job], None] | None, on_tiles: Progress | None) -> Iterator[Outcome]:
    """The image batch: reader and writer threads around the network loop."""
    stages = _Stages(jobs, quality, max_pixels, stdout_format)
    try:
        while True:
            item = stages.decoded.get()
            if item is _DONE:
                break
            if not isinstance(item, _Decoded):
                raise TypeError(f"unexpected item in the decode queue: {item!r}")
            item.started = time.perf_counter() - item.read_seconds
            if item.error is not None or item.picture is None:
                yield Outcome(item.job, error=item.error, seconds=time.perf_counter() - item.started)
                continue
            if on_start is not None:
                on_start(item.job)
            computed = time.perf_counter()
            try:
                restored = restore_picture(restorer, item.picture, on_tiles)
            except MprnetError as error:
                yield Outcome(item.job, error=error, seconds=time.perf_counter() - item.started)
                continue
            compute_seconds = time.perf_counter() - computed
            stages.to_write.put((item, restored, compute_seconds))
            # Report this image before the next one starts when its write is quick; waiting
            # costs at most a twentieth of the compute it would otherwise overlap.
            yield from stages.drain_finished(wait=WRITE_WAIT_SHARE * compute_seconds)
    except KeyboardInterrupt:
        # Report what the writer completes while we stop, then let the interrupt go on.
        stages.close()
        yield from stages.drain_finished()
        raise
    finally:
        stages.close()
    yield from stages.drain_finished()
