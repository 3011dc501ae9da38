"""Batches through the command line: folders, failures in the middle, resume, interrupts."""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from mprnet_cli.cli import app

from . import hostile_corpus
from .conftest import TINY_CHECKPOINT, interruptible, write_image

runner = CliRunner()
WEIGHTS = ["--weights", str(TINY_CHECKPOINT), "--device", "cpu"]
MPRNET = Path(sys.executable).parent / "mprnet"


def _image(path: Path, size: int = 24) -> Path:
    return write_image(path, size + 8, size, noise=True)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Nested folders, mixed formats, a corrupt and a zero-byte image in the middle."""
    root = tmp_path / "in"
    _image(root / "a.png")
    _image(root / "b.jpg")
    (root / "c_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    (root / "d_empty.jpg").write_bytes(b"")
    _image(root / "trip" / "e.webp")
    _image(root / "trip" / "day2" / "f.tif")
    _image(root / ".thumbs" / "g.png")
    (root / "readme.txt").write_text("not an image")
    return root


def _outputs(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_folder_batch_goes_on_after_bad_files_and_summarises(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, ["derain", str(folder), "-r", "-o", str(out), *WEIGHTS])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert _outputs(out) == ["a.png", "b.jpg", "trip/day2/f.tif", "trip/e.webp"]
    lines = result.stderr.splitlines()
    assert f"skipped {folder / 'readme.txt'}: not an image" in lines
    assert "skipped 1 hidden file(s)" in lines
    assert f"error: {folder / 'd_empty.jpg'}: empty file, not an image" in lines
    assert any(line.startswith(f"error: {folder / 'c_corrupt.png'}: truncated or corrupt image") for line in lines)
    assert lines[-1].startswith("4 done, 2 skipped, 2 failed; ")


def test_fail_fast_stops_at_the_first_failure(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, ["derain", str(folder), "-o", str(out), "--fail-fast", *WEIGHTS])
    assert result.exit_code == 1
    assert result.stderr.count("error: ") == 1
    assert "trip" not in _outputs(out) if out.exists() else True


def test_rerun_skips_what_exists_and_overwrite_redoes_it(tmp_path: Path) -> None:
    source = tmp_path / "in"
    for name in ("a.png", "b.png", "c.png"):
        _image(source / name)
    out = tmp_path / "out"
    first = runner.invoke(app, ["denoise", str(source), "-o", str(out), "--ext", "jpg", *WEIGHTS])
    assert first.exit_code == 0, first.stderr
    assert _outputs(out) == ["a.jpg", "b.jpg", "c.jpg"]
    (out / "b.jpg").unlink()
    stamp = (out / "a.jpg").stat().st_mtime_ns
    second = runner.invoke(app, ["denoise", str(source), "-o", str(out), "--ext", "jpg", *WEIGHTS])
    assert second.exit_code == 0, second.stderr
    assert f"skipped {source / 'a.png'}: {out / 'a.jpg'} exists (use --overwrite to redo it)" in second.stderr
    assert second.stderr.splitlines()[-1].startswith("1 done, 2 skipped, 0 failed; ")
    assert (out / "a.jpg").stat().st_mtime_ns == stamp
    third = runner.invoke(app, ["denoise", str(source), "-o", str(out), "--ext", "jpg", "--overwrite", *WEIGHTS])
    assert third.exit_code == 0 and third.stderr.splitlines()[-1].startswith("3 done, 0 skipped, 0 failed; ")
    nothing = runner.invoke(app, ["denoise", str(source), "-o", str(out), "--ext", "jpg", *WEIGHTS])
    assert nothing.exit_code == 0
    assert nothing.stderr.splitlines()[-1] == "nothing to do: every output exists (use --overwrite to redo them)"


def test_colliding_names_in_a_folder_keep_their_extension_with_one_warning(tmp_path: Path) -> None:
    _image(tmp_path / "in" / "x.png")
    _image(tmp_path / "in" / "x.jpg")
    out = tmp_path / "out"
    result = runner.invoke(app, ["deblur", str(tmp_path / "in"), "-o", str(out), "--ext", "png", *WEIGHTS])
    assert result.exit_code == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == (f"warning: 2 output name(s) keep their input's extension, since another input would get "
                        f"the same name ({tmp_path / 'in' / 'x.jpg'} -> {out / 'x.jpg.png'})")
    assert sorted(path.name for path in out.iterdir()) == ["x.jpg.png", "x.png.png"]
    assert sum(line.startswith("warning: ") for line in lines) == 1


def test_colliding_named_files_are_refused_before_any_work(tmp_path: Path) -> None:
    png, jpg = _image(tmp_path / "in" / "x.png"), _image(tmp_path / "in" / "x.jpg")
    out = tmp_path / "out"
    result = runner.invoke(app, ["deblur", str(png), str(jpg), "-o", str(out), "--ext", "png", *WEIGHTS])
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: {png} and {jpg} would both be written to {out / 'x.png'}; rename one, or restore them in separate runs\n"
    )
    assert not out.exists()


def test_unwritable_output_directory(tmp_path: Path) -> None:
    _image(tmp_path / "in" / "x.png")
    blocker = tmp_path / "out"
    blocker.write_text("a file, not a directory")
    result = runner.invoke(app, ["deblur", str(tmp_path / "in"), "-o", str(blocker), *WEIGHTS])
    assert result.exit_code == 2
    assert result.stderr == f"error: {blocker}: is a file; with several inputs or a directory, -o must be a directory\n"


def test_a_directory_without_write_permission_is_refused_before_any_work(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    _image(tmp_path / "in" / "x.png")
    locked = tmp_path / "locked"
    locked.mkdir()
    access, mkstemp = os.access, tempfile.mkstemp

    # Permission bits mean nothing to root, who may run this suite: both checks stand in.
    def refused(*args: object, dir: str, **kwargs: object) -> tuple[int, str]:  # noqa: A002 - mkstemp's name
        if Path(dir) == locked:
            raise PermissionError(13, "Permission denied")
        return mkstemp(*args, dir=dir, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked and access(path, mode))
    monkeypatch.setattr(tempfile, "mkstemp", refused)
    result = runner.invoke(app, ["deblur", str(tmp_path / "in"), "-o", str(locked / "new" / "deeper"), *WEIGHTS])
    assert (result.exit_code, result.stderr) == (2, f"error: {locked}: cannot write there (Permission denied)\n")
    assert list(locked.iterdir()) == []


def test_a_folder_of_one_image_that_fails_is_a_batch_failure(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    result = runner.invoke(app, ["deblur", str(tmp_path / "in"), "-o", str(tmp_path / "out"), *WEIGHTS])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: {tmp_path / 'in' / 'broken.png'}: truncated or corrupt image")


def test_stdout_format_comes_from_ext(tmp_path: Path) -> None:
    photo = _image(tmp_path / "x.png")
    result = runner.invoke(app, ["deblur", "-", "-o", "-", "--ext", "webp", "--quiet", *WEIGHTS], input=photo.read_bytes())
    assert result.exit_code == 0, result.stderr
    assert result.stdout_bytes[:4] == b"RIFF" and result.stdout_bytes[8:12] == b"WEBP"


def test_interrupt_mid_batch_leaves_no_partial_file_and_a_rerun_completes(tmp_path: Path) -> None:
    source = tmp_path / "in"
    for index in range(12):
        _image(source / f"{index:02d}.png", size=160)
    out = tmp_path / "out"
    command = [str(MPRNET), "deblur", str(source), "-o", str(out), *WEIGHTS]
    env = {**os.environ, "NO_COLOR": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                               preexec_fn=interruptible)
    deadline = time.monotonic() + 60
    while not (out.exists() and any(out.glob("*.png"))) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr.decode()
    assert stdout == b""
    summary = stderr.decode().splitlines()[-1]
    assert "not done (interrupted)" in summary
    written = _outputs(out)
    assert 1 <= len(written) < 12
    assert all(not name.startswith(".") for name in written)  # no temporary files left behind
    for name in written:
        Image.open(out / name).load()  # every file under its final name is whole

    rerun = subprocess.run(command, capture_output=True, env=env, timeout=120)
    assert rerun.returncode == 0, rerun.stderr.decode()
    assert _outputs(out) == [f"{index:02d}.png" for index in range(12)]
    assert rerun.stderr.decode().splitlines()[-1].startswith(f"{12 - len(written)} done, {len(written)} skipped, 0 failed; ")


def test_sigterm_stops_like_ctrl_c(tmp_path: Path) -> None:
    source = tmp_path / "in"
    for index in range(12):
        _image(source / f"{index:02d}.png", size=160)
    out = tmp_path / "out"
    process = subprocess.Popen([str(MPRNET), "deblur", str(source), "-o", str(out), *WEIGHTS], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (out.exists() and any(out.glob("*.png"))) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.terminate()
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr.decode()
    assert all(not p.name.startswith(".") for p in out.iterdir())


# --- files from the wild ------------------------------------------------------------------

#: The restore of a tiny image with the tiny model: far below this; a decoder that trusted a
#: bomb's header would go far above it (the address-space limit stops it first).
PEAK_RSS_LIMIT = 1.5 * 1024**3
ADDRESS_SPACE = 3 * 1024**3
#: Lines that report one image: `SOURCE -> TARGET (0.00 MP, 0.1 s)`.
OUTCOME = re.compile(r"^(?P<source>.+) -> (?P<target>.+) \(\d+\.\d\d MP, \d+\.\d s\)$")


def _limited_run(arguments: list[str], **env: str) -> tuple[int, str, int]:
    """Run the real executable with a bounded address space; (exit code, stderr, peak RSS in bytes)."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))

    process = subprocess.Popen([str(MPRNET), *arguments], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               preexec_fn=limit, env={**os.environ, "NO_COLOR": "1", **env})
    stderr = process.stderr.read().decode() if process.stderr else ""
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, stderr, usage.ru_maxrss * 1024


def test_a_hostile_folder_never_takes_the_batch_down(tmp_path: Path) -> None:
    """Bombs, truncated files of every format, random bytes, bogus metadata and every pixel
    mode, as one batch: each file is restored or refused in one line of ours."""
    corpus = hostile_corpus.build_corpus(tmp_path / "in")
    out = tmp_path / "out"
    code, stderr, peak = _limited_run(["denoise", str(corpus.folder), "-o", str(out), "--weights", str(TINY_CHECKPOINT),
                                       "--precision", "fp32"])
    assert code == 1, stderr
    assert "Traceback" not in stderr and peak < PEAK_RSS_LIMIT
    lines = stderr.splitlines()
    summary = re.fullmatch(r"(\d+) done, 0 skipped, (\d+) failed; .*", lines[-1])
    assert summary is not None, lines[-1]
    outcomes = [match for match in map(OUTCOME.match, lines) if match]
    errors = [line for line in lines if line.startswith("error: ")]
    assert all(line.startswith(("error: ", "warning: ")) or OUTCOME.match(line) for line in lines[:-1])
    sources = {Path(match["source"]).name for match in outcomes} | {
        Path(line[len("error: "):].split(": ")[0]).name for line in errors}
    assert sources == {path.name for path in corpus.folder.iterdir()}
    assert (int(summary[1]), int(summary[2])) == (len(outcomes), len(errors))
    for name in corpus.bombs:
        assert any(line.startswith(f"error: {corpus.folder / name}: ") for line in errors), name
    for name in corpus.bombs - {"tile_bomb.tif"}:
        assert any(f"{corpus.folder / name}: declares an image of" in line for line in errors), name
    for match in outcomes:  # every output readable, at its input's size
        with Image.open(match["source"]) as source, Image.open(match["target"]) as target:
            assert target.size == source.size, match["source"]
        name = Path(match["source"]).name
        if name in corpus.transparent:
            dropped = f"warning: {match['target']}: " in stderr and "transparency" in stderr
            assert _has_alpha(Path(match["target"])) or dropped, f"{name} lost its alpha silently"
    assert len(outcomes) >= 20 and {Path(m["source"]).name for m in outcomes} >= corpus.transparent


def _has_alpha(path: Path) -> bool:
    """Pillow reads 16-bit RGBA PNG as RGBA too; OpenCV's channel count settles any doubt."""
    import cv2

    pixels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    return pixels is not None and pixels.ndim == 3 and pixels.shape[2] in (2, 4)


def test_a_bomb_among_good_images_costs_only_itself(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    for name in ("a.png", "z.png"):
        _image(folder / name)
    (folder / "m.icns").write_bytes(hostile_corpus.icns_bomb())
    code, stderr, _ = _limited_run(["denoise", str(folder), "-o", str(tmp_path / "out"), *WEIGHTS])
    assert code == 1, stderr
    assert f"error: {folder / 'm.icns'}: declares an image of 40,000,000,000 pixels" in stderr
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["a.png", "z.png"]


@pytest.mark.parametrize(
    ("name", "warnings"),
    [("corrupt_strip.tif", ["Fax4Decode: Bad code word at line 36 of strip 0 (x 62)."]),
     ("bad_icc.png", ["its ICC colour profile is damaged; it is left out", "libpng warning: iCCP: too short"])],
)
def test_c_library_chatter_is_one_line_of_ours(tmp_path: Path, name: str, warnings: list[str]) -> None:
    source = tmp_path / name
    source.write_bytes(hostile_corpus.bogus_metadata()[name])
    target = tmp_path / f"out{source.suffix}"
    code, stderr, _ = _limited_run(["denoise", str(source), "-o", str(target), *WEIGHTS])
    assert code == 0, stderr
    lines = stderr.splitlines()
    assert lines[:-1] == [f"warning: {source}: {warning}" for warning in warnings]
    assert OUTCOME.match(lines[-1])


def test_library_chatter_is_shown_in_full_with_debug(tmp_path: Path) -> None:
    source = tmp_path / "scan"  # no extension: planning sniffs it, and Pillow warns as it does
    tags = hostile_corpus._tiff_gray(8, 8) + [(270, 2, 1000, 99999), (273, 4, 1, 0), (278, 4, 1, 8), (279, 4, 1, 64)]
    source.write_bytes(hostile_corpus.tiff_bytes(tags))
    target = tmp_path / "out.png"
    _, quiet, _ = _limited_run(["denoise", str(tmp_path), "-o", str(tmp_path / "out"), *WEIGHTS])
    warnings = [line for line in quiet.splitlines() if line.startswith("warning: ")]
    # Once as planning sniffs it, once as it is read: each time one line that names it.
    assert warnings == [f"warning: {source}: Tag data larger than file. Skipping tag 270"] * 2, quiet
    code, debug, _ = _limited_run(["denoise", str(source), "-o", str(target), "--overwrite", *WEIGHTS],
                                  MPRNET_DEBUG="1")
    assert code == 0, debug
    assert f"warning: {source}: Tag data larger than file. Skipping tag 270" in debug.splitlines()
