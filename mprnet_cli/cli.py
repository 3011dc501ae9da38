"""The `mprnet` command line: options, help with examples, and errors turned into exit codes.

The only module that imports typer or rich. Heavy modules (torch) are imported inside the
commands, so `mprnet --help` answers at once.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, Iterator, Optional

import typer

from mprnet_cli.errors import MprnetError

LICENSE_NOTE = (
    "The published MPRNet checkpoints are the authors' (Zamir et al., CVPR 2021), released under "
    "their Academic Public License: non-commercial use only. mprnet ships no weights."
)

TASK_HELP = {
    "deblur": "Remove motion blur (MPRNet trained on GoPro).",
    "derain": "Remove rain streaks (MPRNet trained on Rain13K).",
    "denoise": "Remove real camera noise (MPRNet trained on SIDD).",
}

app = typer.Typer(
    name="mprnet",
    help=f"Restore photos with MPRNet: deblur, derain, denoise, on images of any size.\n\n{LICENSE_NOTE}",
    epilog=(
        "Examples:\n\n"
        "  mprnet deblur photo.jpg -o sharp.jpg --weights model_deblurring.pth\n\n"
        "  mprnet derain frame.png --device cuda --weights model_deraining.pth\n\n"
        "  cat noisy.png | mprnet denoise - -o - --weights model_denoising.pth > clean.png"
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
        raise typer.BadParameter(f"{value!r}: expected auto, 0 (whole image) or a tile size in pixels")
    size = int(text)
    if size and (size < 32 or size % 8):
        raise typer.BadParameter(f"{size}: a tile size must be a multiple of 8 and at least 32 (or 0 for none)")
    return size


Inputs = Annotated[list[str], typer.Argument(metavar="INPUT", help="Image file to restore, or - for standard input.", show_default=False)]
OutputOption = Annotated[
    Optional[str],
    typer.Option("-o", "--output", help="Output file (format from its extension), or - for standard output (PNG). "
                 "Default: beside the input, with a task suffix (photo_deblurred.jpg)."),
]
WeightsOption = Annotated[Optional[str], typer.Option("--weights", "-w", help="Checkpoint file (.pth or .safetensors).")]
DeviceOption = Annotated[str, typer.Option("--device", "-d", help="auto, cpu, cuda, cuda:N or mps. auto: CUDA, then MPS, then CPU.")]
PrecisionOption = Annotated[
    str, typer.Option("--precision", help="fp32 (the exact reference), bf16, fp16 (GPU only) or auto.")
]
TileOption = Annotated[
    str, typer.Option("--tile", "-t", help="Tile size in pixels (multiple of 8, >= 32); 0 runs the whole image at once.")
]
TileOverlapOption = Annotated[int, typer.Option("--tile-overlap", min=0, help="Pixels of overlap between tiles.")]
QualityOption = Annotated[int, typer.Option("--quality", min=1, max=100, help="JPEG/WebP quality.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")]


@contextmanager
def _user_errors() -> Iterator[None]:
    """Turn our errors into one line on stderr and an exit code; MPRNET_DEBUG=1 shows tracebacks."""
    try:
        yield
    except MprnetError as error:
        if os.environ.get("MPRNET_DEBUG") == "1":
            raise
        typer.echo(f"error: {error.message}", err=True)
        raise typer.Exit(error.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None


class _StderrFormatter(logging.Formatter):
    """Plain lines for information, `warning: ...` for the rest, as compilers print them."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        return message if record.levelno <= logging.INFO else f"{record.levelname.lower()}: {message}"


def _configure_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_StderrFormatter())
    logger.handlers[:] = [handler]
    logger.setLevel(logging.ERROR if quiet else logging.INFO)
    logger.propagate = False


def _make_task_command(task: str):  # noqa: ANN202 - Typer reads the signature of the returned function
    def command(
        inputs: Inputs,
        output: OutputOption = None,
        weights: WeightsOption = None,
        device: DeviceOption = "auto",
        precision: PrecisionOption = "fp32",
        tile: TileOption = "auto",
        tile_overlap: TileOverlapOption = 32,
        quality: QualityOption = 95,
        quiet: QuietOption = False,
    ) -> None:
        tile_size = _parse_tile(tile)
        _configure_logging(quiet)
        with _user_errors():
            from mprnet_cli import pipeline

            jobs = pipeline.plan_jobs(inputs, output, task)
            restorer = pipeline.load_restorer(task, weights, device, precision)
            for outcome in pipeline.run_jobs(restorer, jobs, quality=quality):
                if outcome.error is not None:
                    raise outcome.error
                destination = "stdout" if outcome.job.target == pipeline.STDIO else outcome.job.target
                logger.info("%s -> %s (%.2f MP, %.1f s)", outcome.job.source, destination, outcome.megapixels, outcome.seconds)

    command.__doc__ = TASK_HELP[task]
    command.__name__ = task
    return command


_EXAMPLES = {
    "deblur": "mprnet deblur photo.jpg -o sharp.jpg --weights model_deblurring.pth",
    "derain": "mprnet derain frame.png --device cuda --weights model_deraining.pth",
    "denoise": "cat noisy.png | mprnet denoise - -o - --weights model_denoising.pth > clean.png",
}

for _task in TASK_HELP:
    app.command(
        name=_task,
        epilog=f"Example:\n\n  {_EXAMPLES[_task]}\n\n{LICENSE_NOTE}",
        no_args_is_help=True,
    )(_make_task_command(_task))


def main() -> None:
    """The console script: like `app()`, but a usage error is one `error:` line, not a panel."""
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
            typer.echo(f"error: {message} (see `mprnet --help`)", err=True)
        sys.exit(error.exit_code)
    sys.exit(result if isinstance(result, int) else 0)
