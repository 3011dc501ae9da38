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
from pathlib import Path

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
    """One image or clip to restore: paths, or `-` for stdin/stdout."""

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


def _looks_like_an_image(path: Path, image_extensions: set[str]) -> bool:
    """Known image and video extensions are taken on trust (a broken one fails visibly
    later); anything else is sniffed, so an image is known by its content."""
    return path.suffix.lower() in image_extensions or is_video_path(path) or opens_as_an_image(path)


def _is_hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _expand(argument: str, recursive: bool) -> list[tuple[Path, Path]] | None:
    """(file, path relative to the argument's root) for a directory or a glob; None for a plain path."""
    path = Path(argument)
    if path.is_dir():
        pattern = "**/*" if recursive else "*"
        return [(p, p.relative_to(path)) for p in sorted(path.glob(pattern)) if p.is_file() or _is_broken_link(p)]
    if glob.has_magic(argument) and not path.exists():  # `photo[1].png` that exists is that file
        # Mirror structure below the pattern's literal leading folders: `shots/*/x.png` -> `<day>/x.png`.
        literal = []
        for part in path.parts:
            if glob.has_magic(part):
                break
            literal.append(part)
        root = Path(*literal) if literal else Path()
        matches = sorted(Path(p) for p in glob.glob(argument, recursive=recursive))
        return [(p, p.relative_to(root)) for p in matches if p.is_file() or _is_broken_link(p)]
    return None


def _is_broken_link(path: Path) -> bool:
    return path.is_symlink() and not path.exists()


def default_target(source: Path, task: str) -> Path:
    """`photo.jpg` -> `photo_deblurred.jpg`, beside the input; never the input itself."""
    return source.with_name(f"{source.stem}{TASK_SUFFIXES[task]}{_own_extension(source)}")


def _own_extension(source: Path) -> str:
    """An image keeps its format where we write it, a clip its container."""
    return source.suffix if source.suffix.lower() in FORMATS or is_video_path(source) else DEFAULT_EXTENSION


def _extension_for(source: Path, naming: OutputNaming) -> str:
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
            if Path(target).is_dir() or target.endswith(("/", os.sep)):
                raise OutputError(f"{target}: one image from standard input needs an output file name, or -o -")
            _named_output(naming, video)
            _check_writable(Path(target).parent, set())
        return Plan([Job(STDIO, target, _container(target, naming) if video else None)])

    sources, named, skipped, batch = _collect_sources(inputs, naming.recursive)
    if not sources:
        raise InputError("no images or videos found in " + ", ".join(inputs) + (" (hidden and non-image files are skipped)" if skipped else ""))
    directory = _output_directory(naming.output, batch)
    if naming.output == STDIO and (batch or len(sources) > 1):
        raise OutputError("-o - writes one image to standard output; give one input, or an output directory")

    targets = [_target_for(source, relative, directory, naming) for source, relative in sources]
    renamed = _keep_source_extensions(sources, named, targets, directory, naming)
    videos = [_container(target, naming) if is_video_path(source) else None for (source, _), target in zip(sources, targets)]
    resolved_targets = [None if target == STDIO else Path(target).resolve() for target in targets]
    # A folder restored before holds its outputs beside their inputs: those are results, not inputs.
    produced_by = {resolved: source for (source, _), resolved in zip(sources, resolved_targets) if resolved}
    jobs, renamed_jobs, seen, writable = [], [], {}, set()
    for index, ((source, _), target, resolved, video) in enumerate(zip(sources, targets, resolved_targets, videos)):
        if index in renamed:
            renamed_jobs.append(Job(str(source), target, video))
        resolved_source = source.resolve()
        maker = produced_by.get(resolved_source)
        if maker is not None and maker != source:
            skipped.append((str(source), f"it is the output of {maker}"))
            continue
        if resolved is not None:
            if resolved == resolved_source:
                raise OutputError(f"{target}: refusing to overwrite the input; choose another output name or --suffix")
            if resolved in seen:
                raise OutputError(f"{seen[resolved]} and {source} would both be written to {target}; "
                                  "rename one, or restore them in separate runs")
            seen[resolved] = source
            if Path(target).is_dir():
                raise OutputError(f"{target}: is a directory; give a file name")
            if Path(target).exists() and not naming.overwrite:
                skipped.append((str(source), f"{target} exists (use --overwrite to redo it)"))
                continue
            _check_writable(Path(target).parent, writable)
        jobs.append(Job(str(source), target, video))
    return Plan(jobs, skipped, batch, renamed_jobs)


def _keep_source_extensions(sources: list[tuple[Path, Path]], named: set[Path], targets: list[str],
                            directory: Path | None, naming: OutputNaming) -> set[int]:
    """Rename, in `targets`, the outputs that found files would share (`a.jp2` and `a.j2k`
    both to `a.png`): each keeps its source extension (`a.jp2.png`, `a.j2k.png`), so a whole
    folder is not refused for one clash. Every file of a clash is renamed, the one whose
    format is kept too: an earlier run's `a.png`, made when the folder held `a.jp2` alone,
    is then never taken for the new `a.png`'s result. Files named on the command line keep
    their names, and files of the same name (from two folders) cannot be told apart by
    it: such clashes are refused later. Returns the indices renamed."""
    groups: dict[Path, list[int]] = defaultdict(list)
    for index, target in enumerate(targets):
        if target != STDIO:
            groups[Path(target).resolve()].append(index)
    renamed = set()
    for indices in groups.values():
        if len(indices) < 2 or len({sources[i][0].name for i in indices}) < len(indices):
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


def list_images(argument: str) -> list[tuple[Path, Path]]:
    """(image file, its path relative to `argument`) for a folder (walked recursively), a
    glob or one file; hidden, broken and non-image files left out, as a batch leaves them."""
    return [(path, relative) for path, relative in _collect_sources([argument], recursive=True)[0]
            if not is_video_path(path)]


def _collect_sources(
    inputs: list[str], recursive: bool,
) -> tuple[list[tuple[Path, Path]], set[Path], list[tuple[str, str]], bool]:
    """All image files named by `inputs`, with their relative paths; those of them named
    on the command line; what was skipped; and whether this is a batch (a directory, a
    glob or several inputs)."""
    image_extensions = readable_extensions()
    sources: list[tuple[Path, Path]] = []
    skipped: list[tuple[str, str]] = []
    named: set[Path] = set()  # resolved, to find a file named twice
    named_paths: set[Path] = set()
    batch = len(inputs) > 1
    for argument in inputs:
        expanded = _expand(argument, recursive)
        if expanded is None:
            path = Path(argument)
            if not path.exists():
                raise InputError(f"{argument}: no such file or directory")
            resolved = path.resolve()
            if resolved in named:
                skipped.append((str(path), "named more than once"))
            else:
                named.add(resolved)
                named_paths.add(path)
                sources.append((path, Path(path.name)))
            continue
        batch = True
        # A glob leaves hidden files out itself unless its pattern asks for them (`.*`).
        in_directory = Path(argument).is_dir()
        for path, relative in expanded:
            if in_directory and _is_hidden(relative):
                skipped.append((str(path), "hidden"))
            elif _is_broken_link(path):
                skipped.append((str(path), "a broken link"))
            elif not _looks_like_an_image(path, image_extensions):
                skipped.append((str(path), "not an image"))
            else:
                sources.append((path, relative))
    return sources, named_paths, skipped, batch


def _output_directory(output: str | None, batch: bool) -> Path | None:
    """The directory outputs go into, or None for 'beside each input' / a single named file."""
    if output is None or output == STDIO:
        return None
    path = Path(output)
    if batch or path.is_dir() or output.endswith(("/", os.sep)):
        if path.exists() and not path.is_dir():
            raise OutputError(f"{output}: is a file; with several inputs or a directory, -o must be a directory")
        looks_like_a_file = path.suffix.lower() in FORMATS or is_video_path(path)
        if not path.exists() and looks_like_a_file and not output.endswith(("/", os.sep)):
            raise OutputError(f"{output}: several inputs need an output directory, not a file name "
                              f"(for a directory of that name, write {output}/)")
        return path
    return None


def _target_for(source: Path, relative: Path, directory: Path | None, naming: OutputNaming,
                keep_extension: bool = False) -> str:
    if naming.output == STDIO:
        return STDIO
    if directory is None and naming.output is not None:
        return _named_output(naming, is_video_path(source))
    suffix = naming.suffix if naming.suffix is not None else ("" if directory else TASK_SUFFIXES[naming.task])
    name = f"{source.name if keep_extension else source.stem}{suffix}{_extension_for(source, naming)}"
    if directory is None:
        return str(source.with_name(name))
    return str(directory / relative.parent / name)


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
        fmt = format_for(Path(output))
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


def restore_picture(restorer: Restorer, picture: Picture, progress: Progress | None = None) -> Picture:
    return picture.with_pixels(restorer.restore_array(picture.pixels, progress))


def _read(source: str, max_pixels: int | None) -> Picture:
    if source == STDIO:
        if sys.stdin is None:  # started with `<&-`
            raise InputError("-: standard input is closed")
        return decode_image(sys.stdin.buffer.read(), "stdin", max_pixels)
    return read_image(Path(source), max_pixels)


def _write(picture: Picture, target: str, stdout_format: str, quality: int) -> None:
    to_stdout = target == STDIO
    fmt = stdout_format if to_stdout else format_for(Path(target))
    label = "stdout" if to_stdout else target
    try:
        data = encode_image(picture, fmt, quality, label)
    except (OSError, ValueError) as error:  # Pillow's encoders: size limits, unsupported modes
        raise OutputError(f"{label}: cannot encode as {fmt} ({error})") from None
    if to_stdout:
        _write_stdout(data)
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
                item.picture = _read(job.source, self._max_pixels)
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
                _write(restored, decoded.job.target, self._stdout_format, self._quality)
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
                yield _restore_clip(restorer, job, encoding, span, resume, on_start, on_frames)
        else:
            yield from _run_images(restorer, list(group), quality, max_pixels, stdout_format, on_start, on_tiles)


def _restore_clip(restorer: Restorer, job: Job, encoding: Encoding, span: Span, resume: bool,
                  on_start: Callable[[Job], None] | None, on_frames: FrameProgress | None) -> Outcome:
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
        source = sys.stdin.buffer if job.source == STDIO else job.source
        target = sys.stdout.buffer if job.target == STDIO else job.target
        with contextlib.nullcontext() if job.target == STDIO else _folders_for(Path(job.target)):
            summary = video.restore_video(restorer, source, target, container=job.video, encoding=encoding,
                                          span=span, progress=on_frames, resume=resume)
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
