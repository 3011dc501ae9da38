"""The `mprnet` command line: options, help with examples, and errors turned into exit codes.

The only module that imports typer or rich. Heavy modules (torch) are imported inside the
commands, so `mprnet --help` answers at once.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import warnings
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Annotated, Callable, Iterator, Optional

import typer

from mprnet_cli.errors import CheckpointError, InputError, MprnetError, OutputError

if TYPE_CHECKING:
    from mprnet_cli.cluster import ClusterOptions
    from mprnet_cli.evaluate import Evaluation
    from mprnet_cli.model.restorer import Restorer
    from mprnet_cli.pipeline import Job, Outcome, Plan
    from mprnet_cli.video import Encoding, Span

LICENSE_NOTE = (
    "The published MPRNet checkpoints are the authors' (Zamir et al., CVPR 2021), released under "
    "their Academic Public License: non-commercial use only. mprnet ships no weights."
)

TASK_HELP = {
    "deblur": "Remove motion blur (MPRNet trained on GoPro).",
    "derain": "Remove rain streaks (MPRNet trained on Rain13K).",
    "denoise": "Remove real camera noise (MPRNet trained on SIDD).",
}

def _examples(*lines: str) -> str:
    """An epilog of examples, one a line. It starts with a newline: Typer dedents help text
    as a docstring, by the indent common to every line but the first, so "Examples:" must
    not be the first line for the examples to keep their indent."""
    return "\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


def _plain_value_names(params: list) -> list:  # noqa: ANN001 - Typer's parameter classes
    """Typer 0.29's Rich help prints each parameter's `display_type_rich()` beside it: an
    option's metavar when it has one, else its annotation as a type (`<str>`, `<int
    range>`). Flags get one too (`--quiet <bool>`), though they take no value (0.28 and
    Typer's plain formatter print none), and arguments always (`INPUT <list[str]>`),
    whatever their metavar. So valued options name their value with a metavar, and flags
    and arguments, whose name is all there is to show, get no type."""
    from typer.core import TyperArgument

    for param in params:
        if isinstance(param, TyperArgument) or getattr(param, "is_flag", False):
            param.display_type_rich = lambda ctx: None
    return params


class _Command(typer.core.TyperCommand):
    def get_params(self, ctx: typer.Context) -> list:  # noqa: D102
        return _plain_value_names(super().get_params(ctx))


class _Group(typer.core.TyperGroup):
    def get_params(self, ctx: typer.Context) -> list:  # noqa: D102
        return _plain_value_names(super().get_params(ctx))


class _Typer(typer.Typer):
    """A Typer whose commands and groups name values plainly in their help (see above)."""

    def __init__(self, **settings: object) -> None:
        settings.setdefault("cls", _Group)
        super().__init__(**settings)

    def command(self, *args: object, **settings: object):  # noqa: ANN201 - Typer's decorator
        settings.setdefault("cls", _Command)
        return super().command(*args, **settings)


app = _Typer(
    name="mprnet",
    help=f"Restore photos with MPRNet: deblur, derain, denoise, on images of any size.\n\n{LICENSE_NOTE}",
    epilog=_examples(
        "mprnet deblur photo.jpg -o sharp.jpg",
        "mprnet derain ./rainy -o ./clean --device cuda",
        "cat noisy.png | mprnet denoise - -o - > clean.png",
        "mprnet weights list",
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)

logger = logging.getLogger("mprnet")


def _package_version() -> str:
    try:
        return version("mprnet")
    except PackageNotFoundError:
        return "unknown"


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"mprnet {_package_version()}")
        raise typer.Exit()


@app.callback()
def _main(
    show_version: Annotated[
        bool, typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


def _parse_tile(value: str) -> int | None:
    """`auto` -> None (decide per image), `0` -> whole image, `N` -> N x N tiles."""
    text = value.strip().lower()
    if text == "auto":
        return None
    if not text.isdigit():
        raise typer.BadParameter(f"{value!r}: expected auto, 0 (whole image) or a tile size in pixels",
                                 param_hint="'--tile'")
    return int(text)


def _check_tiling(tile: int | None, overlap: int, blend: str) -> None:
    from mprnet_cli.tiling import TileOptionError, check_tile_options

    try:
        check_tile_options(tile, overlap, blend)
    except TileOptionError as error:
        raise typer.BadParameter(str(error), param_hint=f"'--{error.option.replace('_', '-')}'") from None


def _check_quality(ensemble: int, tlc_train_size: int) -> None:
    from mprnet_cli.model.restorer import ENSEMBLE_SIZES

    if ensemble not in ENSEMBLE_SIZES:
        raise typer.BadParameter(f"{ensemble}: expected one of {', '.join(map(str, ENSEMBLE_SIZES))}",
                                 param_hint="'--ensemble'")
    if tlc_train_size % 8:
        raise typer.BadParameter(f"{tlc_train_size}: expected a multiple of 8, as MPRNet's inputs are",
                                 param_hint="'--tlc-train-size'")


def _check_suffix(suffix: str | None) -> None:
    if suffix is not None and any(separator in suffix for separator in {"/", os.sep}):
        raise typer.BadParameter(f"{suffix!r}: a suffix is added to file names and cannot hold a path separator",
                                 param_hint="'--suffix'")


def _check_terminals(jobs: list[Job]) -> None:
    """Refuse to wait for an image typed at a terminal, or to print one onto it."""
    from mprnet_cli.pipeline import STDIO

    if any(job.source == STDIO for job in jobs) and sys.stdin is not None and sys.stdin.isatty():
        raise InputError("standard input is a terminal; pipe an image in (cat photo.png | mprnet ...) or name a file")
    if any(job.target == STDIO for job in jobs) and sys.stdout is not None and sys.stdout.isatty():
        raise OutputError("standard output is a terminal; redirect it (> restored.png) or give -o a file name")


#: The panels of a task's help, in this order after the general options (help, quiet).
IO_PANEL, MODEL_PANEL, TILING_PANEL, BATCH_PANEL = "Input and output", "Model", "Tiling", "Batch"
VIDEO_PANEL, QUALITY_PANEL, SCORING_PANEL, CLUSTER_PANEL = "Video", "Quality", "Scoring", "Cluster"


def _in_range(low: int, high: int | None = None):  # noqa: ANN202 - a Typer callback
    """Check a number's range in words, not in the help's placeholder (Typer's min= and
    max= print `[x>=0]` there, and answer "Input should be greater than or equal to 0")."""

    def check(value: float | None) -> float | None:
        if value is None:  # an optional one left out
            return value
        if value < low or (high is not None and value > high):
            raise typer.BadParameter(f"{value}: expected {low} to {high}" if high is not None else
                                     f"{value}: expected {low} or more")
        return value

    return check


Inputs = Annotated[
    list[str],
    typer.Argument(metavar="INPUT", help="Image or video files, folders, globs or URIs (s3://...); - for standard input.",
                   show_default=False),
]
OutputOption = Annotated[
    Optional[str],
    typer.Option("-o", "--output", metavar="PATH", rich_help_panel=IO_PANEL,
                 help="A file, a folder or URI, or - for stdout. Default: beside each input."),
]
WeightsOption = Annotated[
    Optional[str],
    typer.Option("--weights", "-w", metavar="PATH", rich_help_panel=MODEL_PANEL,
                 help="A file or hf://owner/repo/file.pth\\[@rev] (default: the published checkpoint)."),
]
DeviceOption = Annotated[str, typer.Option("--device", "-d", metavar="auto|cpu|cuda[:N]|mps", rich_help_panel=MODEL_PANEL,
                                           help="auto: CUDA, then MPS, then CPU.")]
PrecisionOption = Annotated[
    str, typer.Option("--precision", metavar="auto|fp32|bf16|fp16", rich_help_panel=MODEL_PANEL, show_default=False,
                      help="auto (default): bf16 for 8-bit images where native, else fp32 (exact). bf16: "
                      "always. fp16: GPU only.")
]
TileOption = Annotated[
    str, typer.Option("--tile", "-t", metavar="auto|0|N", rich_help_panel=TILING_PANEL, show_default=False,
                      help="auto (default): tiles only if the image does not fit; 0: the whole image; N: N x N "
                      "tiles.")
]
TileOverlapOption = Annotated[int, typer.Option("--tile-overlap", metavar="N", callback=_in_range(0),
                                                rich_help_panel=TILING_PANEL, help="Pixels of overlap between tiles.")]
TileBlendOption = Annotated[
    str, typer.Option("--tile-blend", metavar="feather|core|split", rich_help_panel=TILING_PANEL, show_default=False,
                      help="feather (default) or core; split also hides MPRNet's seams in each tile, with 1.75x "
                      "the tiles.")
]
QualityOption = Annotated[int, typer.Option("--quality", metavar="1-100", callback=_in_range(1, 100),
                                            rich_help_panel=IO_PANEL, help="JPEG and WebP quality.")]
TlcOption = Annotated[bool, typer.Option("--tlc", rich_help_panel=QUALITY_PANEL,
                                         help="Channel attention over local windows, as in training (TLC).")]
TlcTrainSizeOption = Annotated[
    int, typer.Option("--tlc-train-size", metavar="N", callback=_in_range(8), rich_help_panel=QUALITY_PANEL,
                      help="The training crop that sets --tlc's windows. Default: 256.", show_default=False)
]
EnsembleOption = Annotated[
    int, typer.Option("--ensemble", metavar="1|2|4|8", rich_help_panel=QUALITY_PANEL, show_default=False,
                      help="Average N flips and turns (N forwards). Default: 1.")
]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]
RayOption = Annotated[bool, typer.Option("--ray", rich_help_panel=CLUSTER_PANEL,
                                         help="Spread the batch over a Ray cluster (pip install 'mprnet\\[ray]').")]
RayAddressOption = Annotated[
    Optional[str], typer.Option("--ray-address", metavar="ADDRESS", rich_help_panel=CLUSTER_PANEL,
                                help="The cluster's head. Default: $RAY_ADDRESS, else Ray started here.")
]
WorkersOption = Annotated[
    Optional[int], typer.Option("--workers", metavar="N", callback=_in_range(1), rich_help_panel=CLUSTER_PANEL,
                                help="At most N model workers. Default: one per GPU, else one per node.")
]


@contextmanager
def _user_errors() -> Iterator[None]:
    """Turn our errors into one line on stderr and an exit code; MPRNET_DEBUG=1 shows tracebacks."""
    try:
        yield
    except MprnetError as error:
        if _debugging():
            raise
        typer.echo(f"error: {_one_line(error.message)}", err=True)
        raise typer.Exit(error.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None


#: Control characters, as Python writes them in a string literal.
_ESCAPES = {code: repr(chr(code))[1:-1] for code in (*range(32), 127)}


def _one_line(text: str) -> str:
    """A file name may hold a newline: escaped, each message stays one line for scripts."""
    return text.translate(_ESCAPES)


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: object = None, line: str | None = None) -> None:
    """A library's warning (Pillow's on damaged EXIF, say) as one of our lines, not Python's
    two-line report with its source file."""
    logger.warning("%s", message)


def _debugging() -> bool:
    """MPRNET_DEBUG=1: tracebacks and debug lines for bug reports."""
    return os.environ.get("MPRNET_DEBUG") == "1"


class _StderrFormatter(logging.Formatter):
    """Plain lines for information, `warning: ...` for the rest, as compilers print them."""

    def format(self, record: logging.LogRecord) -> str:
        message = _one_line(record.getMessage())
        return message if record.levelno <= logging.INFO else f"{record.levelname.lower()}: {message}"


def _configure_logging(quiet: bool) -> None:
    from mprnet_cli import library_messages

    warnings.showwarning = _show_warning
    # What decoders print or warn becomes one line per file, naming it. This moves our own
    # stderr off descriptor 2 first, so the handler below must be made after it. Debugging
    # leaves descriptor 2 alone: what a library prints as it crashes must reach the user.
    library_messages.install(capture_descriptor=not _debugging())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_StderrFormatter())
    logger.handlers[:] = [handler]
    logger.setLevel(logging.ERROR if quiet else logging.DEBUG if _debugging() else logging.INFO)
    logger.propagate = False
    # The hub client logs every retry of an unreachable server; our one error line says it
    # all. It reads this when first imported (later, lazily); a user's own setting wins.
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")


RecursiveOption = Annotated[bool, typer.Option("--recursive", "-r", rich_help_panel=BATCH_PANEL,
                                               help="Walk the subfolders of folder inputs.")]
SuffixOption = Annotated[
    Optional[str],
    typer.Option("--suffix", metavar="SUFFIX", rich_help_panel=IO_PANEL,
                 help="Added to output names. Default: the task's; none in an -o folder."),
]
ExtOption = Annotated[
    Optional[str], typer.Option("--ext", metavar="FORMAT", rich_help_panel=IO_PANEL,
                                help="Images: png, jpg, webp, tif, bmp; clips: mp4, mkv, webm, mov, ts. Default: the input's.")
]
OverwriteOption = Annotated[bool, typer.Option("--overwrite", rich_help_panel=BATCH_PANEL,
                                               help="Redo outputs that exist (default: skip them).")]
FailFastOption = Annotated[bool, typer.Option("--fail-fast", rich_help_panel=BATCH_PANEL,
                                              help="Stop at the first image that fails.")]
CodecOption = Annotated[
    Optional[str], typer.Option("--codec", metavar="h264|hevc|av1|vp9|ffv1", rich_help_panel=VIDEO_PANEL,
                                help="Default: the input's where mprnet encodes it, else h264.")
]
CrfOption = Annotated[
    Optional[int], typer.Option("--crf", metavar="N", rich_help_panel=VIDEO_PANEL,
                                help="Lower is better. Default: visually lossless (h264: 18).")
]
PresetOption = Annotated[
    Optional[str], typer.Option("--preset", metavar="NAME", rich_help_panel=VIDEO_PANEL,
                                help="Encoder speed: ultrafast..veryslow; 0-13 for av1.")
]
FramesOption = Annotated[
    Optional[str], typer.Option("--frames", metavar="START:END", rich_help_panel=VIDEO_PANEL,
                                help="Only frames START to END-1 (from 0; either optional).")
]
StartOption = Annotated[
    Optional[float], typer.Option("--start", metavar="SECONDS", callback=_in_range(0), rich_help_panel=VIDEO_PANEL,
                                  help="Restore each clip from this time on.")
]
EndOption = Annotated[
    Optional[float], typer.Option("--end", metavar="SECONDS", callback=_in_range(0), rich_help_panel=VIDEO_PANEL,
                                  help="Restore each clip up to this time.")
]
ResumeOption = Annotated[
    bool, typer.Option("--resume", rich_help_panel=VIDEO_PANEL,
                       help="Keep finished 10 s segments; a rerun goes on from them.")
]
MaxPixelsOption = Annotated[
    int, typer.Option("--max-pixels", metavar="N", callback=_in_range(0), rich_help_panel=IO_PANEL, show_default=False,
                      help="Refuse images over N pixels. Default: 250000000; 0: no limit.")
]


def _parse_span(frames: str | None, start: float | None, end: float | None) -> Span:
    """`--frames 10:20` or `--start/--end` seconds, as the part of each clip to restore."""
    from mprnet_cli.video import Span

    if frames is not None and (start is not None or end is not None):
        raise typer.BadParameter("give --frames or --start/--end, not both", param_hint="'--frames'")
    if end is not None and end <= (start or 0.0):
        raise typer.BadParameter(f"{end}: must come after --start ({start or 0})", param_hint="'--end'")
    if frames is None:
        return Span(start=start or None, end=end)
    first, separator, stop = frames.partition(":")
    if not separator or not all(part.strip().isdigit() for part in (first, stop) if part.strip()):
        raise typer.BadParameter(f"{frames!r}: expected START:END frame numbers, such as 0:100, 50: or :25",
                                 param_hint="'--frames'")
    span = Span(first=int(first) if first.strip() else 0, stop=int(stop) if stop.strip() else None)
    if span.stop is not None and span.stop <= span.first:
        raise typer.BadParameter(f"{frames!r}: END must be greater than START", param_hint="'--frames'")
    return span


def _interrupt_on_sigterm() -> None:
    """SIGTERM stops a run the way Ctrl-C does: in a batch, finish writes in flight and
    summarise; exit 130."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


class _Report:
    """Per-image lines or live progress bars (images, and the tiles of the current image)
    on stderr, and the closing summary. Bars only on a terminal, and never with --quiet."""

    def __init__(self, total: int, quiet: bool) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)
        self.total, self.quiet = total, quiet
        self.done = self.failed = 0
        self._closed = False
        self.megapixels = 0.0
        self.started = time.perf_counter()
        self.bar = self.images = self.tiles = self.frames = None
        self.tiles_started = self.frames_started = self.frames_logged = 0.0
        self.clip = ""
        if not quiet and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), console=self.console, transient=True,
            )
            if total > 1:
                self.images = self.bar.add_task("starting", total=total, rate="")
            self.bar.start()

    def start(self, job: Job) -> None:
        self.clip = job.source
        if self.bar is None:
            return
        if self.images is not None:
            self.bar.update(self.images, description=_one_line(job.source))
        for task in (self.tiles, self.frames):
            if task is not None:
                self.bar.remove_task(task)
        self.tiles = self.frames = None

    #: Without a terminal, a clip's progress is a line this often (seconds).
    FRAME_LINE_INTERVAL = 30.0

    def frame_progress(self, done: int, total: int | None) -> None:
        """A clip's frames: a bar with frames per second and ETA on a terminal, else a line
        every FRAME_LINE_INTERVAL seconds for logs of long runs."""
        now = time.perf_counter()
        if done == 0:
            self.frames_started = self.frames_logged = now
            if self.bar is not None:
                self.frames = self.bar.add_task("  frames", total=total, rate="")
            return
        rate = done / max(now - self.frames_started, 1e-9)
        if self.bar is not None and self.frames is not None:
            self.bar.update(self.frames, completed=done, rate=f"{rate:.2f} fps")
        elif now - self.frames_logged >= self.FRAME_LINE_INTERVAL:
            self.frames_logged = now
            self._print(f"{self.clip}: {done}{f'/{total}' if total else ''} frames, {rate:.2f} fps")

    def tile_progress(self, done: int, total: int) -> None:
        if self.bar is None or total < 2:
            return
        now = time.perf_counter()
        if self.tiles is None:  # at 0 done, the restorer's call before the first tile
            self.tiles_started = now
            self.tiles = self.bar.add_task("  tiles", total=total, rate="")
        if done:
            rate = done / max(now - self.tiles_started, 1e-9)
            self.bar.update(self.tiles, completed=done, rate=f"{rate:.2f} tiles/s")

    def outcome(self, outcome: Outcome) -> None:
        from mprnet_cli.pipeline import STDIO

        job = outcome.job
        if outcome.error is not None:
            self.failed += 1
            self._print(f"error: {outcome.error.message}", always=True)
        else:
            self.done += 1
            self.megapixels += outcome.megapixels
            target = "stdout" if job.target == STDIO else job.target
            if job.video is not None:
                what = f"{outcome.frames} frames, {outcome.duration:.1f} s of video"
            else:
                what = f"{outcome.megapixels:.2f} MP"
            self._print(f"{job.source} -> {target} ({what}, {outcome.seconds:.1f} s)")
        if self.images is not None:
            elapsed = time.perf_counter() - self.started
            self.bar.update(self.images, advance=1, rate=f"{self.megapixels / elapsed:.2f} MP/s")

    def _print(self, line: str, always: bool = False) -> None:
        if self.quiet and not always:
            return
        line = _one_line(line)
        if self.bar is not None:
            self.bar.console.print(line, markup=False, highlight=False)
        else:
            typer.echo(line, err=True)

    def close(self, skipped: int, interrupted: bool, summary: bool = True) -> None:
        if self._closed:
            return
        self._closed = True
        if self.bar is not None:
            self.bar.stop()
        if summary and (self.total > 1 or skipped or interrupted):
            elapsed = time.perf_counter() - self.started
            parts = [f"{self.done} done", f"{skipped} skipped", f"{self.failed} failed"]
            if interrupted:
                parts.append(f"{self.total - self.done - self.failed} not done (interrupted)")
            self._print(f"{', '.join(parts)}; {self.megapixels:.1f} MP in {elapsed:.1f} s", always=interrupted)


def _report_skipped(skipped: list[tuple[str, str]]) -> None:
    hidden = sum(1 for _, reason in skipped if reason == "hidden")
    for path, reason in skipped:
        if reason != "hidden":
            logger.info("skipped %s: %s", path, reason)
    if hidden:
        logger.info("skipped %d hidden file(s)", hidden)


def _report_renamed(renamed: list[Job]) -> None:
    if renamed:
        example = renamed[0]
        logger.warning("%d output name(s) keep their input's extension, since another input would get the same "
                       "name (%s -> %s)", len(renamed), example.source, example.target)


def _make_task_command(task: str):  # noqa: ANN202 - Typer reads the signature of the returned function
    def command(
        inputs: Inputs,
        output: OutputOption = None,
        weights: WeightsOption = None,
        device: DeviceOption = "auto",
        precision: PrecisionOption = "auto",
        tile: TileOption = "auto",
        tile_overlap: TileOverlapOption = 32,
        tile_blend: TileBlendOption = "feather",
        recursive: RecursiveOption = False,
        suffix: SuffixOption = None,
        ext: ExtOption = None,
        overwrite: OverwriteOption = False,
        fail_fast: FailFastOption = False,
        max_pixels: MaxPixelsOption = 250_000_000,
        quality: QualityOption = 95,
        codec: CodecOption = None,
        crf: CrfOption = None,
        preset: PresetOption = None,
        frames: FramesOption = None,
        start: StartOption = None,
        end: EndOption = None,
        resume: ResumeOption = False,
        tlc: TlcOption = False,
        tlc_train_size: TlcTrainSizeOption = 256,
        ensemble: EnsembleOption = 1,
        ray: RayOption = False,
        ray_address: RayAddressOption = None,
        workers: WorkersOption = None,
        quiet: QuietOption = False,
    ) -> None:
        _configure_logging(quiet)
        with _user_errors():
            _interrupt_on_sigterm()  # from here on: loading or downloading weights can take long
            tile_size = _parse_tile(tile)
            _check_tiling(tile_size, tile_overlap, tile_blend)
            _check_quality(ensemble, tlc_train_size)
            _check_suffix(suffix)
            span = _parse_span(frames, start, end)
            from mprnet_cli import pipeline, video
            from mprnet_cli.imageio import FORMATS

            encoding = video.Encoding(codec, crf, preset)
            video.check_encoding(encoding)

            cluster = _cluster_options(ray, ray_address, workers)
            if cluster is None:  # on a cluster, each worker checks the device it has
                pipeline.check_device_options(device, precision)
            extension = pipeline.normalise_extension(ext)
            naming = pipeline.OutputNaming(task, output, suffix, extension, overwrite, recursive)
            plan = pipeline.plan_jobs(inputs, naming)
            _check_terminals(plan.jobs)
            if cluster is not None and any(pipeline.STDIO in (job.source, job.target) for job in plan.jobs):
                raise InputError("--ray restores files and folders; standard input and output need a local run")
            _report_skipped(plan.skipped)
            _report_renamed(plan.renamed)
            if not plan.jobs:
                logger.info("nothing to do: every output exists (use --overwrite to redo them)")
                return
            restorer_options = {"tile": tile_size, "tile_overlap": tile_overlap, "tile_blend": tile_blend,
                                "tlc_train_size": tlc_train_size if tlc else None, "ensemble": ensemble}
            if cluster is None:
                restorer = pipeline.load_restorer(task, weights, device, precision, **restorer_options,
                                                  progress_bar=_progress_bar(quiet))

                def run(report: _Report) -> Iterator[Outcome]:
                    return pipeline.run_jobs(restorer, plan.jobs, quality=quality, max_pixels=max_pixels or None,
                                             stdout_format=FORMATS.get(extension or "", "PNG"), encoding=encoding,
                                             span=span, resume=resume, on_start=report.start,
                                             on_tiles=report.tile_progress, on_frames=report.frame_progress)
            else:
                from mprnet_cli.cluster import WorkerSettings, run_jobs

                checkpoint = pipeline.checked_checkpoint(task, weights, progress_bar=_progress_bar(quiet))
                settings = WorkerSettings(task, device=device, precision=precision, restorer_options=restorer_options,
                                          quality=quality, max_pixels=max_pixels or None, encoding=encoding, span=span,
                                          resume=resume)

                def run(report: _Report) -> Iterator[Outcome]:
                    return run_jobs(plan.jobs, checkpoint, settings, cluster)
        _run_batch(run, plan, quiet, fail_fast)

    command.__doc__ = TASK_HELP[task]
    command.__name__ = task
    return command


def _cluster_options(ray: bool, address: str | None, workers: int | None) -> ClusterOptions | None:
    """None for a local run; `--ray-address` and `--workers` mean nothing without `--ray`."""
    if not ray:
        for name, value in (("--ray-address", address), ("--workers", workers)):
            if value is not None:
                raise typer.BadParameter("only applies with --ray", param_hint=f"'{name}'")
        return None
    from mprnet_cli.cluster import ClusterOptions, import_ray

    import_ray()  # a missing extra is said before any planning
    return ClusterOptions(address, workers)


def _run_batch(run: Callable[[_Report], Iterator[Outcome]], plan: Plan, quiet: bool, fail_fast: bool) -> None:
    """Report the outcomes `run` yields as a batch does; exit 1 on a failure in a batch,
    130 on an interrupt."""
    report = _Report(len(plan.jobs), quiet)
    interrupted = False
    first_error = None
    outcomes = run(report)
    with _user_errors():  # a cluster that cannot be reached, say: its line, without a summary
        try:
            for outcome in outcomes:
                report.outcome(outcome)
                if outcome.error is not None:
                    first_error = first_error or outcome.error
                    if fail_fast:
                        break
        except KeyboardInterrupt:
            interrupted = True
        except MprnetError:
            report.close(len(plan.skipped), interrupted, summary=False)
            raise
        finally:
            outcomes.close()
            report.close(len(plan.skipped), interrupted)
    if interrupted:
        raise typer.Exit(130)
    if first_error is not None:
        # One image: its own error code (2 for a bad input). A batch: 1, "something failed".
        raise typer.Exit(1 if plan.batch else first_error.exit_code)


_EXAMPLES = {
    "deblur": [
        "mprnet deblur photo.jpg -o sharp.jpg",
        "mprnet deblur ./shots -r -o ./sharp --ext png  # a folder tree, mirrored",
        "mprnet deblur panorama.jpg --tile 512 --tile-blend split  # best seams",
        "mprnet deblur clip.mp4 -o sharp.mp4 --frames 0:48  # a video: try its first 48 frames",
    ],
    "derain": [
        "mprnet derain frame.png --device cuda",
        "mprnet derain './rainy/*.jpg' -o ./clean --overwrite",
        "mprnet derain frame.png --weights model_deraining.pth  # a local checkpoint",
        "mprnet derain dashcam.mkv --codec hevc --crf 22  # sound, timing and colours kept",
    ],
    "denoise": [
        "cat noisy.png | mprnet denoise - -o - > clean.png",
        "mprnet denoise scan.tif -o clean.tif --precision fp32  # 16-bit, exact reference",
        "cat night.mkv | mprnet denoise - --ext mkv -o - > clean.mkv",
    ],
}

for _task in TASK_HELP:
    app.command(
        name=_task,
        help=f"{TASK_HELP[_task]}\n\n{LICENSE_NOTE}",
        epilog=_examples(*_EXAMPLES[_task]),
        no_args_is_help=True,
    )(_make_task_command(_task))


# --- mprnet weights ... -------------------------------------------------------------------

weights_app = _Typer(
    name="weights",
    help="List, download, locate and verify the published checkpoints (cached by huggingface_hub).",
    epilog=_examples("mprnet weights list", "mprnet weights download all", "mprnet weights verify deblur"),
    no_args_is_help=True,
)
app.add_typer(weights_app)

TaskChoice = Annotated[str, typer.Argument(metavar="TASK", help="deblur, derain or denoise.", show_default=False)]
TasksChoice = Annotated[str, typer.Argument(metavar="TASK|all", help="deblur, derain, denoise or all.")]


def _tasks(choice: str, allow_all: bool = True) -> list[str]:
    if allow_all and choice == "all":
        return list(TASK_HELP)
    if choice not in TASK_HELP:
        raise typer.BadParameter(f"{choice!r}: expected {', '.join(TASK_HELP)}{' or all' if allow_all else ''}")
    return [choice]


def _progress_bar(quiet: bool) -> type | None:
    """None lets huggingface_hub draw its own bar on stderr (only on a terminal); quiet silences it."""
    if not quiet:
        return None
    from tqdm import tqdm

    class SilentBar(tqdm):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **{**kwargs, "disable": True})

    return SilentBar


@contextmanager
def _weights_module() -> Iterator[ModuleType]:
    """Logs on stderr, our errors as one line, and the weights module imported on demand."""
    _configure_logging(quiet=False)
    with _user_errors():
        from mprnet_cli import weights

        yield weights


@weights_app.command("list")
def weights_list() -> None:
    """Show each task's checkpoint source, revision, size, whether it is cached, and its license."""
    with _weights_module() as weights:
        rows = [("task", "source", "revision", "size", "cached", "license")]
        for task in TASK_HELP:
            source = weights.configured_source(task)
            if isinstance(source, weights.WeightsEntry):
                cached = weights.cached_file(source)
                size = source.size or (cached.stat().st_size if cached else None)
                rows.append((task, f"hf://{source.repo_id}/{source.filename}", source.revision,
                             weights.human_size(size) if size else "?", "yes" if cached else "no", source.license))
            else:
                size = weights.human_size(source.stat().st_size) if source.is_file() else "missing"
                rows.append((task, str(source), "-", size, "local", "-"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
        for row in rows:
            typer.echo("  ".join([cell.ljust(width) for cell, width in zip(row, widths)] + [row[-1]]))


@weights_app.command("download")
def weights_download(
    task: TasksChoice = "all",
    force: Annotated[bool, typer.Option("--force", help="Download again even when cached.")] = False,
) -> None:
    """Download and verify checkpoints now (e.g. before going offline); prints TASK: PATH."""
    with _weights_module() as weights:
        for name in _tasks(task):
            source = weights.configured_source(name)
            path = weights.fetch(source, force=force) if isinstance(source, weights.WeightsEntry) else source
            typer.echo(f"{name}: {path}")


@weights_app.command("path")
def weights_path(task: TaskChoice) -> None:
    """Print the local checkpoint file for TASK, downloading it first if needed."""
    with _weights_module() as weights:
        typer.echo(weights.resolve_checkpoint(_tasks(task, allow_all=False)[0]))


@weights_app.command("verify")
def weights_verify(task: TasksChoice = "all") -> None:
    """Re-hash cached checkpoints and compare with the registry or the first download."""
    with _weights_module() as weights:
        failed = []
        for name in _tasks(task):
            source = weights.configured_source(name)
            if not isinstance(source, weights.WeightsEntry):
                typer.echo(f"{name}: local file {source}, not managed by mprnet")
                continue
            result = weights.verify_cached(source)
            typer.echo(f"{name}: {result.detail}")
            if not result.ok:
                failed.append(name)
        if failed:
            raise CheckpointError(f"verification failed for {', '.join(failed)}: run `mprnet weights download {failed[0]} --force`")


# --- mprnet eval ... ----------------------------------------------------------------------

EVAL_EXAMPLES = [
    "mprnet eval deblur --input GoPro/test/input --target GoPro/test/target",
    "mprnet eval derain --restored results/Rain100L --target Rain100L/target --pair-by-order",
    "mprnet eval deblur --input blurry/ --target sharp/ --tile 512 --precision bf16 --json scores.json",
]


def _check_report_path(option: str, path: str | None) -> None:
    """A report that cannot be written is refused before any image is restored."""
    if path is None or path == "-":
        return
    if Path(path).is_dir() or not Path(path).parent.is_dir():
        raise OutputError(f"{option} {path}: expected a file in an existing folder, or - for standard output")


@app.command(
    "eval",
    epilog="Examples:\n\n" + "".join(f"  {example}\n\n" for example in EVAL_EXAMPLES)
    + "The table goes to standard output (to standard error when --json or --csv is -); per-image "
    "scores to --json or --csv. See docs/quality.md for the protocols.",
    no_args_is_help=True,
)
def eval_command(
    task: TaskChoice,
    target: Annotated[str, typer.Option("--target", metavar="PATH", show_default=False, rich_help_panel=SCORING_PANEL,
                                        help="Ground-truth images: a folder (walked recursively) or one file.")],
    inputs: Annotated[Optional[str], typer.Option("--input", metavar="PATH", rich_help_panel=SCORING_PANEL,
                                                  help="Degraded images to restore and score.")] = None,
    restored: Annotated[Optional[str], typer.Option("--restored", metavar="PATH", rich_help_panel=SCORING_PANEL,
                                                    help="Finished outputs to score, instead of --input.")] = None,
    pair_by_order: Annotated[bool, typer.Option("--pair-by-order", rich_help_panel=SCORING_PANEL,
                                                help="Pair the n-th files of each sorted list, not equal names.")] = False,
    metric: Annotated[str, typer.Option("--metric", metavar="auto|matlab-rgb|matlab-y|matlab-float|skimage",
                                        rich_help_panel=SCORING_PANEL,
                                        help="auto: the protocol of the task's published table.")] = "auto",
    json_path: Annotated[Optional[str], typer.Option("--json", metavar="PATH", rich_help_panel=SCORING_PANEL,
                                                     help="Write the means and per-image scores as JSON; - for stdout.")] = None,
    csv_path: Annotated[Optional[str], typer.Option("--csv", metavar="PATH", rich_help_panel=SCORING_PANEL,
                                                    help="Write per-image scores as CSV; - for stdout.")] = None,
    weights: WeightsOption = None,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    tile: TileOption = "auto",
    tile_overlap: TileOverlapOption = 32,
    tile_blend: TileBlendOption = "feather",
    tlc: TlcOption = False,
    tlc_train_size: TlcTrainSizeOption = 256,
    ensemble: EnsembleOption = 1,
    max_pixels: MaxPixelsOption = 250_000_000,
    quiet: QuietOption = False,
) -> None:
    """Score restorations against ground truth with the metrics of the MPRNet paper's tables."""
    _configure_logging(quiet)
    with _user_errors():
        _interrupt_on_sigterm()
        name = _tasks(task, allow_all=False)[0]
        if (inputs is None) == (restored is None):
            raise typer.BadParameter("give --input (images to restore) or --restored (finished outputs), not both",
                                     param_hint="'--input' / '--restored'")
        model_options = {"--weights": weights is not None, "--device": device != "auto", "--precision": precision != "auto",
                         "--tile": tile != "auto", "--tile-overlap": tile_overlap != 32,
                         "--tile-blend": tile_blend != "feather", "--tlc": tlc, "--tlc-train-size": tlc_train_size != 256,
                         "--ensemble": ensemble != 1}
        given = [option for option, set_ in model_options.items() if set_]
        if restored is not None and given:
            raise typer.BadParameter(f"{', '.join(given)}: for restoring with --input; --restored scores "
                                     "finished outputs as they are", param_hint="'--restored'")
        if json_path == "-" and csv_path == "-":
            raise typer.BadParameter("only one of them can go to standard output", param_hint="'--json' / '--csv'")
        tile_size = _parse_tile(tile)
        _check_tiling(tile_size, tile_overlap, tile_blend)
        _check_quality(ensemble, tlc_train_size)
        _check_report_path("--json", json_path)
        _check_report_path("--csv", csv_path)
        from mprnet_cli import evaluate, pipeline

        protocol = evaluate.resolve_protocol(name, metric)
        pairs = evaluate.plan_pairs(inputs or restored or "", target, by_order=pair_by_order,
                                    what="input" if inputs is not None else "restored")
        restorer = None
        if inputs is not None:
            pipeline.check_device_options(device, precision)
            restorer = pipeline.load_restorer(name, weights, device, precision, tile=tile_size,
                                              tile_overlap=tile_overlap, tile_blend=tile_blend,
                                              tlc_train_size=tlc_train_size if tlc else None, ensemble=ensemble,
                                              progress_bar=_progress_bar(quiet))
        logger.info("scoring %d image(s) by %s: %s", len(pairs), protocol.name, protocol.description)
        scores = []
        for score in evaluate.score_pairs(pairs, protocol, restorer, max_pixels or None):
            timing = "" if score.seconds is None else f" ({score.seconds:.1f} s)"
            logger.info("%s: %.3f dB, SSIM %.4f%s", score.name, score.psnr, score.ssim, timing)
            scores.append(score)
        result = evaluate.Evaluation(protocol, scores)
        settings = {"source": "input" if inputs is not None else "restored", "pair_by_order": pair_by_order}
        if restorer is not None:
            settings.update(device=str(restorer.device), precision=str(restorer.dtype).removeprefix("torch."),
                            precision_beyond_8_bits=str(restorer.deep_dtype).removeprefix("torch."),
                            tile=tile, tile_overlap=tile_overlap, tile_blend=tile_blend,
                            tlc_train_size=tlc_train_size if tlc else None, ensemble=ensemble)
        for path, text in ((json_path, evaluate.to_json(result, name, settings) if json_path else None),
                           (csv_path, evaluate.to_csv(result) if csv_path else None)):
            if path == "-":
                typer.echo(text, nl=False)
            elif path is not None:
                from mprnet_cli.imageio import write_atomic

                write_atomic(Path(path), text.encode())
        typer.echo(_evaluation_table(result), err="-" in (json_path, csv_path))


def _evaluation_table(result: Evaluation) -> str:
    """The means, then the worst and the slowest images."""
    lines = [f"protocol  {result.protocol.name}: {result.protocol.description}",
             f"images    {result.count}",
             f"PSNR      {result.psnr:.3f} dB",
             f"SSIM      {result.ssim:.4f}"]
    lines += [f"{'worst' if i == 0 else '':<10}{s.name}: {s.psnr:.3f} dB, SSIM {s.ssim:.4f}"
              for i, s in enumerate(result.worst())]
    lines += [f"{'slowest' if i == 0 else '':<10}{s.name}: {s.seconds:.1f} s" for i, s in enumerate(result.slowest())]
    return "\n".join(_one_line(line) for line in lines)


def _settle_stdout() -> None:
    """After a failed write to stdout (a closed pipe, a full disk), the bytes still buffered
    would fail again in Python's flush at exit, with a traceback after our error line:
    point descriptor 1 at /dev/null first (the recipe of Python's SIGPIPE note)."""
    if sys.stdout is None:
        return
    try:
        sys.stdout.flush()
    except OSError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def main() -> None:
    """The console script: like `app()`, but a usage error is one `error:` line, not a panel."""
    try:
        _run_app()
    finally:
        _settle_stdout()


def _run_app() -> None:
    try:
        result = app(prog_name="mprnet", standalone_mode=False)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
    except Exception as error:
        # Typer's vendored Click raises UsageError and friends; they are not exported, so
        # recognise them by what they carry.
        if not (hasattr(error, "format_message") and hasattr(error, "exit_code")):
            raise
        if type(error).__name__ != "NoArgsIsHelpError":  # its help text is already printed
            message = " ".join(error.format_message().split())
            context = getattr(error, "ctx", None)
            command = context.command_path if context is not None else "mprnet"
            typer.echo(f"error: {message} (see `{command} --help`)", err=True)
        sys.exit(error.exit_code)
    sys.exit(result if isinstance(result, int) else 0)
