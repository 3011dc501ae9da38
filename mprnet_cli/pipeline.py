"""From command-line intent to restored files: plan the jobs, load the model once, run.

Nothing here prints: results come back as values and problems as `MprnetError`s, so the
CLI decides what the user sees. `-` stands for standard input or output.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mprnet_cli.devices import resolve_device
from mprnet_cli.errors import InputError, MprnetError, OutputError
from mprnet_cli.imageio import FORMATS, Picture, decode_image, encode_image, format_for, read_image, write_atomic
from mprnet_cli.model.restorer import Restorer
from mprnet_cli.weights import resolve_checkpoint

STDIO = "-"

TASK_SUFFIXES = {"deblur": "_deblurred", "derain": "_derained", "denoise": "_denoised"}

#: The format written to stdout, and next to an input whose own format cannot be written.
DEFAULT_EXTENSION = ".png"


@dataclass(frozen=True)
class Job:
    """One image to restore: paths, or `-` for stdin/stdout."""

    source: str
    target: str


@dataclass(frozen=True)
class Outcome:
    job: Job
    error: MprnetError | None = None
    megapixels: float = 0.0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def default_target(source: Path, task: str) -> Path:
    """`photo.jpg` -> `photo_deblurred.jpg`, beside the input; never the input itself."""
    extension = source.suffix if source.suffix.lower() in FORMATS else DEFAULT_EXTENSION
    return source.with_name(f"{source.stem}{TASK_SUFFIXES[task]}{extension}")


def plan_jobs(inputs: list[str], output: str | None, task: str) -> list[Job]:
    """Pair each input with its output, checking what can be checked before any work starts."""
    if not inputs:
        raise InputError("no input given")
    if len(inputs) > 1:
        raise InputError("one input at a time for now; give a single file or `-`")
    source = inputs[0]
    if source != STDIO:
        path = Path(source)
        if not path.exists():
            raise InputError(f"{source}: no such file")
        if path.is_dir():
            raise InputError(f"{source}: is a directory; give an image file")
    if output is None:
        target = STDIO if source == STDIO else str(default_target(Path(source), task))
    else:
        target = output
    if target != STDIO:
        target_path = Path(target)
        format_for(target_path)
        if target_path.is_dir():
            raise OutputError(f"{target}: is a directory; give a file name")
        if source != STDIO and target_path.resolve() == Path(source).resolve():
            raise OutputError(f"{target}: refusing to overwrite the input; choose another output name")
    return [Job(source=source, target=target)]


def load_restorer(
    task: str, weights: str | None, device: str, precision: str, *, progress_bar: type | None = None
) -> Restorer:
    """Resolve the device first (cheap, and the likelier mistake), then the checkpoint:
    `weights` (a path or hf:// spec) or, when None, the task's registered one, downloaded
    once with `progress_bar` as huggingface_hub's tqdm class (None: its own, on stderr)."""
    resolved = resolve_device(device)
    checkpoint = resolve_checkpoint(task, weights, tqdm_class=progress_bar)
    return Restorer.from_checkpoint(checkpoint, task, device=resolved, precision=precision)


def restore_picture(restorer: Restorer, picture: Picture) -> Picture:
    return picture.with_pixels(restorer.restore_array(picture.pixels))


def _read(source: str, max_pixels: int | None) -> Picture:
    if source == STDIO:
        return decode_image(sys.stdin.buffer.read(), "stdin", max_pixels)
    return read_image(Path(source), max_pixels)


def _write(picture: Picture, target: str, stdout_format: str, quality: int) -> None:
    if target == STDIO:
        sys.stdout.buffer.write(encode_image(picture, stdout_format, quality))
        sys.stdout.buffer.flush()
        return
    path = Path(target)
    write_atomic(path, encode_image(picture, format_for(path), quality))


def run_jobs(
    restorer: Restorer,
    jobs: Iterable[Job],
    *,
    quality: int = 95,
    max_pixels: int | None = None,
    stdout_format: str = "PNG",
) -> Iterator[Outcome]:
    """Restore each job in turn, yielding one `Outcome` per job; errors stay per job."""
    for job in jobs:
        started = time.perf_counter()
        try:
            picture = _read(job.source, max_pixels)
            restored = restore_picture(restorer, picture)
            _write(restored, job.target, stdout_format, quality)
        except MprnetError as error:
            yield Outcome(job, error=error, seconds=time.perf_counter() - started)
            continue
        height, width = picture.pixels.shape[:2]
        yield Outcome(job, megapixels=height * width / 1e6, seconds=time.perf_counter() - started)
