"""The command line, through Typer's runner and through the real `mprnet` executable."""

from __future__ import annotations

import io
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from mprnet_cli.cli import app, main
from mprnet_cli.model.config import TASK_CONFIGS
from mprnet_cli.model.network import MPRNet

from .conftest import PARITY, TINY_CHECKPOINT

runner = CliRunner()
#: fp32: these tests compare with the authors' own result, which bf16 only approximates.
WEIGHTS = ["--weights", str(TINY_CHECKPOINT), "--precision", "fp32"]
MPRNET = Path(sys.executable).parent / "mprnet"


@pytest.fixture
def photo(tmp_path: Path) -> Path:
    path = tmp_path / "photo.png"
    shutil.copy(PARITY / "input_61x45.png", path)
    return path


def _authors_result() -> np.ndarray:
    return np.asarray(Image.open(PARITY / "restored_61x45.png")).astype(int)


def test_help_shows_examples_and_the_license() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    assert "mprnet deblur photo.jpg -o sharp.jpg" in text
    assert "Academic Public License: non-commercial use only" in text
    for task in ("deblur", "derain", "denoise"):
        task_help = " ".join(runner.invoke(app, [task, "--help"]).stdout.split())
        assert f"mprnet {task} " in task_help.split("Examples:")[1]
        assert "non-commercial use only" in task_help


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.startswith("mprnet ")


def test_restore_to_a_named_file(photo: Path, tmp_path: Path) -> None:
    target = tmp_path / "sharp.png"
    result = runner.invoke(app, ["deblur", str(photo), "-o", str(target), *WEIGHTS])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith(f"{photo} -> {target} (0.00 MP, ")
    assert np.abs(np.asarray(Image.open(target)).astype(int) - _authors_result()).max() <= 1


def test_default_output_sits_beside_the_input_with_a_task_suffix(photo: Path) -> None:
    before = photo.read_bytes()
    result = runner.invoke(app, ["derain", str(photo), *WEIGHTS, "--quiet"])
    assert result.exit_code == 0, result.stderr
    assert (result.stdout, result.stderr) == ("", "")
    assert (photo.parent / "photo_derained.png").is_file()
    assert photo.read_bytes() == before


def test_jpeg_output_with_quality(photo: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["denoise", str(photo), "-o", str(tmp_path / "x.jpg"), "--quality", "80", *WEIGHTS])
    assert result.exit_code == 0, result.stderr
    assert Image.open(tmp_path / "x.jpg").format == "JPEG"


def test_a_camera_jpeg_becomes_a_tiff_with_its_metadata(photo: Path, tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x010F] = "Camera Maker"
    exif.get_ifd(0x8769)[0x9003] = "2026:11:26 10:00:00"  # DateTimeOriginal, in the Exif sub-IFD
    camera = tmp_path / "camera.jpg"
    Image.open(photo).save(camera, exif=exif.tobytes(), dpi=(240, 240))
    result = runner.invoke(app, ["denoise", str(camera), "-o", str(tmp_path / "camera.tif"), *WEIGHTS])
    assert result.exit_code == 0, result.stderr
    written = Image.open(tmp_path / "camera.tif")
    assert written.getexif().get_ifd(0x8769)[0x9003] == "2026:11:26 10:00:00"
    assert written.info["dpi"] == (240, 240)


def test_a_newline_in_a_file_name_does_not_break_the_one_line_per_image(photo: Path, tmp_path: Path) -> None:
    odd = tmp_path / "two\nlines.png"
    shutil.copy(photo, odd)
    result = runner.invoke(app, ["denoise", str(odd), str(tmp_path / "missing\rname.png"), "-o",
                                 str(tmp_path / "out"), *WEIGHTS])
    assert result.exit_code == 2, result.stderr
    assert result.stderr == f"error: {tmp_path}/missing\\rname.png: no such file or directory\n"
    result = runner.invoke(app, ["denoise", str(odd), "-o", f"{tmp_path / 'out'}/", *WEIGHTS])
    assert result.exit_code == 0, result.stderr
    assert result.stderr.startswith(f"{tmp_path}/two\\nlines.png -> {tmp_path}/out/two\\nlines.png (")
    assert result.stderr.count("\n") == 1


def test_a_librarys_warning_is_one_line_of_ours(tmp_path: Path) -> None:
    page = Image.new("RGB", (16, 12), (90, 90, 90))
    scan = tmp_path / "scan.tif"
    page.save(scan, save_all=True, append_images=[page, page])
    scan.write_bytes(scan.read_bytes()[:1000])  # later pages cut off: Pillow warns of corrupt EXIF
    result = _run([str(MPRNET), "denoise", str(scan), "-o", str(tmp_path / "out.png"), *WEIGHTS])
    lines = result.stderr.decode().splitlines()
    assert result.returncode == 0, lines
    assert all(line.startswith("warning: ") for line in lines[:-1]) and lines[-1].startswith(f"{scan} -> ")
    assert any("Corrupt EXIF data" in line for line in lines) and "UserWarning" not in result.stderr.decode()
    assert f"warning: {scan}: only the first frame or page is restored; the others are unreadable" in lines


def test_a_warning_while_writing_names_the_output(tmp_path: Path) -> None:
    """In a batch it comes from the writer thread, beside other images' lines."""
    Image.new("RGBA", (16, 12), (90, 90, 90, 128)).save(tmp_path / "see_through.png")
    result = runner.invoke(app, ["denoise", str(tmp_path / "see_through.png"), "-o", str(tmp_path / "flat.jpg"), *WEIGHTS])
    assert result.exit_code == 0, result.stderr
    assert f"warning: {tmp_path / 'flat.jpg'}: JPEG cannot store transparency; the alpha channel is dropped" in result.stderr


def test_bf16_on_a_cpu_without_it_is_one_warning_and_still_runs(photo: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("mprnet_cli.devices.cpu_has_native_bf16", lambda: False)
    result = runner.invoke(app, ["denoise", str(photo), "-o", str(tmp_path / "out.png"), "--weights",
                                 str(TINY_CHECKPOINT), "--precision", "bf16"])
    assert result.exit_code == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == ("warning: this CPU has no bf16 instructions: bf16 runs emulated here, about 10 times slower "
                        "than fp32 (precision auto picks fp32 here)")
    assert len(lines) == 2 and lines[1].startswith(f"{photo} -> ")


def test_stdin_to_stdout(photo: Path) -> None:
    result = runner.invoke(app, ["deblur", "-", "-o", "-", *WEIGHTS], input=photo.read_bytes())
    assert result.exit_code == 0, result.stderr
    restored = Image.open(io.BytesIO(result.stdout_bytes))
    assert restored.format == "PNG"
    assert np.abs(np.asarray(restored).astype(int) - _authors_result()).max() <= 1
    assert result.stderr.startswith("- -> stdout")


def _error(args: list[str], **kwargs: object) -> tuple[int, str]:
    result = runner.invoke(app, args, **kwargs)  # type: ignore[arg-type]
    assert result.stdout == ""
    return result.exit_code, result.stderr


def test_missing_input(tmp_path: Path) -> None:
    assert _error(["deblur", str(tmp_path / "nope.png"), *WEIGHTS]) == (2, f"error: {tmp_path / 'nope.png'}: no such file or directory\n")


def test_input_that_is_not_an_image(tmp_path: Path) -> None:
    notes = tmp_path / "notes.png"
    notes.write_text("hello")
    assert _error(["deblur", str(notes), *WEIGHTS]) == (2, f"error: {notes}: not an image, or a format mprnet cannot read\n")


def test_stdin_that_is_not_an_image() -> None:
    assert _error(["deblur", "-", "-o", "-", *WEIGHTS], input=b"garbage") == (
        2,
        "error: stdin: not an image, or a format mprnet cannot read\n",
    )


def test_refuses_to_overwrite_the_input(photo: Path) -> None:
    code, stderr = _error(["deblur", str(photo), "-o", str(photo), *WEIGHTS])
    assert (code, stderr) == (2, f"error: {photo}: refusing to overwrite the input; choose another output name or --suffix\n")


def test_unwritable_output_leaves_nothing(photo: Path, tmp_path: Path) -> None:
    # A file where a directory should be: unwritable even for root, who ignores permission bits.
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    target = blocker / "out.png"
    code, stderr = _error(["deblur", str(photo), "-o", str(target), *WEIGHTS])
    assert (code, stderr) == (2, f"error: {blocker}: is a file, so no output directory can be made there\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker", "photo.png"]


def test_unknown_output_format(photo: Path, tmp_path: Path) -> None:
    code, stderr = _error(["deblur", str(photo), "-o", str(tmp_path / "x.gif"), *WEIGHTS])
    assert code == 2 and stderr.startswith(f"error: {tmp_path / 'x.gif'}: unknown output format '.gif'")


def test_missing_weights_file(photo: Path, tmp_path: Path) -> None:
    code, stderr = _error(["deblur", str(photo), "--weights", str(tmp_path / "w.pth")])
    assert (code, stderr) == (2, f"error: checkpoint not found: {tmp_path / 'w.pth'}\n")


def test_checkpoint_of_another_task(photo: Path, tmp_path: Path) -> None:
    derain = tmp_path / "model_deraining.pth"
    torch.save({"state_dict": MPRNet(TASK_CONFIGS["derain"]).state_dict()}, derain)
    code, stderr = _error(["deblur", str(photo), "--weights", str(derain)])
    assert (code, stderr) == (2, f"error: {derain} looks like a derain checkpoint: run `mprnet derain`, not `mprnet deblur`\n")


def test_unavailable_device(photo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a machine with a GPU
    code, stderr = _error(["deblur", str(photo), "--device", "cuda", *WEIGHTS])
    assert code == 2 and stderr.startswith("error: --device cuda: no CUDA GPU is available")


@pytest.mark.parametrize(("option", "message"), [
    (["--device", "gpu"], "error: --device gpu: expected one of auto, cpu, cuda, cuda:N, mps\n"),
    (["--precision", "fp64"], "error: --precision fp64: expected auto, fp32, bf16, fp16\n"),
])
def test_device_options_are_checked_even_when_every_output_exists(photo: Path, tmp_path: Path, option: list[str],
                                                                    message: str) -> None:
    out = tmp_path / "done.png"
    out.write_bytes(b"an earlier result")
    assert _error(["deblur", str(photo), "-o", str(out), *option]) == (2, message)
    assert out.read_bytes() == b"an earlier result"


@pytest.mark.parametrize(("arguments", "message"), [
    (["-"], "error: standard input is a terminal; pipe an image in (cat photo.png | mprnet ...) or name a file\n"),
    (["{photo}", "-o", "-"], "error: standard output is a terminal; redirect it (> restored.png) or give -o a file name\n"),
])
def test_images_are_neither_awaited_from_nor_printed_to_a_terminal(photo: Path, arguments: list[str], message: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    class _Terminal(io.BytesIO):
        buffer = property(lambda self: self)

        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stdin", _Terminal())
    monkeypatch.setattr(sys, "stdout", _Terminal())
    monkeypatch.setattr(sys, "argv", ["mprnet", "deblur", *(a.format(photo=photo) for a in arguments), *WEIGHTS])
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    with pytest.raises(SystemExit) as exit_status:
        main()
    assert (exit_status.value.code, stderr.getvalue()) == (2, message)
    assert sys.stdout.getvalue() == b""


def test_debug_shows_the_exception(photo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPRNET_DEBUG", "1")
    result = runner.invoke(app, ["deblur", str(photo), "--weights", "nope.pth"])
    assert result.exit_code == 1
    assert "checkpoint not found: nope.pth" in str(result.exception)
    assert logging.getLogger("mprnet").level == logging.DEBUG  # debug lines too


def test_tiled_run_matches_the_python_api(photo: Path, tmp_path: Path) -> None:
    from mprnet_cli import Restorer

    target = tmp_path / "tiled.png"
    options = ["--tile", "32", "--tile-overlap", "8", "--tile-blend", "feather"]
    result = runner.invoke(app, ["deblur", str(photo), "-o", str(target), *WEIGHTS, *options])
    assert result.exit_code == 0, result.stderr
    assert result.stderr.startswith(f"{photo} -> {target} ")  # no progress bar when stderr is not a terminal
    restorer = Restorer.from_checkpoint(TINY_CHECKPOINT, device="cpu", tile=32, tile_overlap=8, tile_blend="feather")
    np.testing.assert_array_equal(np.asarray(Image.open(target)), restorer.restore(np.asarray(Image.open(photo))))



def test_tlc_and_ensemble_reach_the_restorer(photo: Path, tmp_path: Path) -> None:
    from mprnet_cli import Restorer

    target = tmp_path / "better.png"
    options = ["--tlc", "--tlc-train-size", "16", "--ensemble", "2", "--tile", "0"]
    result = runner.invoke(app, ["deblur", str(photo), "-o", str(target), *WEIGHTS, *options])
    assert result.exit_code == 0, result.stderr
    restorer = Restorer.from_checkpoint(TINY_CHECKPOINT, device="cpu", tile=0, tlc_train_size=16, ensemble=2)
    plain = Restorer.from_checkpoint(TINY_CHECKPOINT, device="cpu", tile=0).restore(np.asarray(Image.open(photo)))
    better = restorer.restore(np.asarray(Image.open(photo)))
    assert np.abs(better.astype(int) - plain).max() > 2  # the options do change this result
    np.testing.assert_array_equal(np.asarray(Image.open(target)), better)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--tile", "big"], "for '--tile': 'big': expected auto, 0 (whole image) or a tile size in pixels"),
        (["--tile", "64", "--tile-overlap", "40"],
         "for '--tile-overlap': tile overlap 40 is too large for 64-pixel tiles with the feather blend (at most 32: "
         "a quarter of the tile with split, else half)"),
        (["--tile-blend", "smooth"], "for '--tile-blend': unknown tile blend 'smooth': expected one of feather, core, split"),
        (["--suffix", "_x/../y"], "for '--suffix': '_x/../y': a suffix is added to file names and cannot hold a path "
         "separator"),
    ],
)
def test_bad_options_name_themselves(photo: Path, options: list[str], message: str, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Through `main`, as the console script runs: usage errors are one line too."""
    monkeypatch.setattr(sys, "argv", ["mprnet", "deblur", str(photo), *WEIGHTS, *options])
    with pytest.raises(SystemExit) as exit_status:
        main()
    assert exit_status.value.code == 2
    assert capsys.readouterr() == ("", f"error: Invalid value {message} (see `mprnet deblur --help`)\n")


def _run(command: str | list[str], **kwargs: object) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "NO_COLOR": "1"}
    return subprocess.run(command, capture_output=True, env=env, timeout=120, **kwargs)  # type: ignore[call-overload]


def test_real_executable_in_a_shell_pipe(photo: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.png"
    pipeline = f"cat '{photo}' | '{MPRNET}' deblur - -o - --weights '{TINY_CHECKPOINT}' --precision fp32 > '{out}'"
    finished = _run(["bash", "-o", "pipefail", "-c", pipeline])
    assert finished.returncode == 0, finished.stderr
    assert np.abs(np.asarray(Image.open(out)).astype(int) - _authors_result()).max() <= 1


def test_real_executable_usage_error_is_one_line(photo: Path) -> None:
    finished = _run([str(MPRNET), "deblur", str(photo), "--tile", "33"])
    assert finished.returncode == 2
    assert finished.stdout == b""
    assert finished.stderr.decode() == (
        "error: Invalid value for '--tile': tile size 33: must be a multiple of 8 and at least 32 (or 0 for none) "
        "(see `mprnet deblur --help`)\n"
    )


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_real_executable_on_a_full_stdout_is_one_line(photo: Path) -> None:
    with open("/dev/full", "wb") as full:
        finished = subprocess.run([str(MPRNET), "deblur", str(photo), "-o", "-", *WEIGHTS], stdout=full,
                                  stderr=subprocess.PIPE, timeout=120)
    assert (finished.returncode, finished.stderr) == (2, b"error: stdout: cannot write (No space left on device)\n")


def test_real_executable_into_a_closed_pipe_is_one_line(photo: Path) -> None:
    process = subprocess.Popen([str(MPRNET), "deblur", str(photo), "-o", "-", *WEIGHTS], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # the reader is gone before the image is written
    stderr = process.stderr.read()
    assert (process.wait(timeout=120), stderr) == (
        2, b"error: stdout: the reading end of the pipe closed before the image was written\n")


def test_real_executable_with_stdin_closed_is_one_line(photo: Path, tmp_path: Path) -> None:
    result = _run(f"'{MPRNET}' denoise - -o '{tmp_path / 'x.png'}' --weights '{TINY_CHECKPOINT}' <&-", shell=True)
    assert (result.returncode, result.stderr.decode()) == (2, "error: -: standard input is closed\n")


def _kernel_tells_where_processes_sleep() -> bool:
    """Some kernels hide it (wchan reads 0 for every process)."""
    sleeper = subprocess.Popen(["sleep", "5"])
    try:
        time.sleep(0.3)
        wchan = Path(f"/proc/{sleeper.pid}/wchan")
        return wchan.exists() and wchan.read_text() not in ("", "0")
    finally:
        sleeper.kill()
        sleeper.wait()


def test_real_executable_stops_on_sigterm_while_loading_weights(tmp_path: Path) -> None:
    """Opening a FIFO blocks until a writer comes: a load that takes as long as wanted. The
    kernel says where a process sleeps; `wait_for_partner` is a FIFO's open (Linux)."""
    if not _kernel_tells_where_processes_sleep():
        pytest.skip("needs Linux's /proc/PID/wchan to see where the process waits")
    fifo = tmp_path / "weights.pth"
    os.mkfifo(fifo)
    process = subprocess.Popen([str(MPRNET), "denoise", str(PARITY / "input_61x45.png"), "-o", str(tmp_path / "x.png"),
                                "--weights", str(fifo)], stderr=subprocess.PIPE, env={**os.environ, "NO_COLOR": "1"})
    deadline = time.monotonic() + 60
    while Path(f"/proc/{process.pid}/wchan").read_text() != "wait_for_partner":
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert (process.returncode, stderr.decode()) == (130, "interrupted\n")


def test_real_executable_help_is_fast_and_has_examples() -> None:
    finished = _run([str(MPRNET), "--help"])
    assert finished.returncode == 0
    assert b"mprnet deblur photo.jpg" in finished.stdout
    assert b"torch" not in _run([sys.executable, "-X", "importtime", "-c", "import mprnet_cli.cli"]).stderr


def test_module_entry_point(photo: Path) -> None:
    finished = _run([sys.executable, "-m", "mprnet_cli", "--version"])
    assert finished.returncode == 0 and finished.stdout.startswith(b"mprnet ")


def test_tile_progress_bar_only_on_a_terminal_and_never_when_quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    from mprnet_cli.cli import _Report

    assert _Report(total=1, quiet=False).bar is None  # stderr is not a terminal under pytest
    monkeypatch.setattr(Console, "is_terminal", property(lambda self: True))
    assert _Report(total=1, quiet=True).bar is None
    report = _Report(total=1, quiet=False)
    report.tile_progress(1, 1)  # one tile: no bar for it
    assert report.tiles is None
    report.tile_progress(0, 6)  # shown from the start, with no rate until a tile is done
    task = report.bar.tasks[-1]
    assert (task.completed, task.total, task.fields["rate"]) == (0, 6, "")
    report.tile_progress(2, 6)
    assert (task.completed, task.total) == (2, 6) and task.fields["rate"].endswith("tiles/s")
    report.close(skipped=0, interrupted=False)


def test_the_progress_bar_shows_file_names_as_they_are(monkeypatch: pytest.MonkeyPatch) -> None:
    """Brackets are no markup, and a newline is escaped as in every other line."""
    from rich.console import Console

    from mprnet_cli.cli import _Report
    from mprnet_cli.pipeline import Job

    monkeypatch.setattr(Console, "is_terminal", property(lambda self: True))
    report = _Report(total=2, quiet=False)
    report.start(Job("x[/]y[b].png\n", "o.png"))
    with report.console.capture() as captured:
        report.console.print(report.bar.make_tasks_table(report.bar.tasks))
    assert "x[/]y[b].png\\n" in captured.get()
    report.close(skipped=0, interrupted=False)
