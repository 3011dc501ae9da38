"""`mprnet eval` and `mprnet_cli.evaluate`: pairing, scoring through the Restorer, reports,
and every error as one line with its exit code."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mprnet_cli import evaluate
from mprnet_cli.cli import main
from mprnet_cli.errors import InputError
from mprnet_cli.metrics import PROTOCOLS
from mprnet_cli.model.restorer import Restorer

from .conftest import TINY_CHECKPOINT

FLAT_SSIM = (2 * 100 * 103 + 2.55**2) / (100**2 + 103**2 + 2.55**2)  # no variance: the luminance term alone


def _save(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def _flat(value: int, height: int = 16, width: int = 20) -> np.ndarray:
    return np.full((height, width, 3), value, dtype=np.uint8)


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """restored/{a,sub/b}.png three levels off their targets/{a,sub/b}.jpg... as PNG too."""
    restored, targets = tmp_path / "restored", tmp_path / "targets"
    _save(restored / "a.png", _flat(103))
    _save(restored / "sub" / "b.png", _flat(103))
    _save(targets / "a.png", _flat(100))
    _save(targets / "sub" / "b.bmp", _flat(100))  # another extension: paired by name without it
    return restored, targets


def _main(arguments: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["mprnet", "eval", *arguments])
    with pytest.raises(SystemExit) as exit_status:
        main()
    out, err = capsys.readouterr()
    return exit_status.value.code, out, err


def test_pairs_by_relative_path_without_the_extension(folders: tuple[Path, Path]) -> None:
    restored, targets = folders
    pairs = evaluate.plan_pairs(str(restored), str(targets))
    assert [(p.name, p.source, p.target) for p in pairs] == [
        ("a.png", restored / "a.png", targets / "a.png"),
        ("sub/b.png", restored / "sub" / "b.png", targets / "sub" / "b.bmp"),
    ]


def test_pairs_by_sorted_order(tmp_path: Path) -> None:
    for index, name in enumerate(["x1.png", "x2.png"]):
        _save(tmp_path / "out" / name, _flat(index))
    for index, name in enumerate(["norain-1.png", "norain-2.png"]):
        _save(tmp_path / "gt" / name, _flat(index))
    pairs = evaluate.plan_pairs(str(tmp_path / "out"), str(tmp_path / "gt"), by_order=True)
    assert [(p.source.name, p.target.name) for p in pairs] == [("x1.png", "norain-1.png"), ("x2.png", "norain-2.png")]


def test_two_single_files_pair_whatever_their_names(folders: tuple[Path, Path]) -> None:
    restored, targets = folders
    pairs = evaluate.plan_pairs(str(restored / "a.png"), str(targets / "sub" / "b.bmp"))
    assert [(p.name, p.source, p.target) for p in pairs] == [("a.png", restored / "a.png", targets / "sub" / "b.bmp")]


def test_two_single_files_are_scored_from_the_command_line(folders: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    restored, targets = folders
    code, out, err = _main(["deblur", "--restored", str(restored / "a.png"), "--target", str(targets / "sub" / "b.bmp")],
                           monkeypatch, capsys)
    assert code == 0, err
    assert out.splitlines()[1:3] == ["images    1", f"PSNR      {20 * math.log10(255 / 3):.3f} dB"]


def test_table_on_stdout_with_known_scores(folders: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    restored, targets = folders
    code, out, err = _main(["deblur", "--restored", str(restored), "--target", str(targets)], monkeypatch, capsys)
    psnr = 20 * math.log10(255 / 3)
    assert code == 0
    assert out == (
        "protocol  matlab-rgb: the deblurring tables: 8-bit RGB, PSNR and MATLAB's 3-D SSIM\n"
        "images    2\n"
        f"PSNR      {psnr:.3f} dB\n"
        f"SSIM      {FLAT_SSIM:.4f}\n"
        f"worst     a.png: {psnr:.3f} dB, SSIM {FLAT_SSIM:.4f}\n"
        f"          sub/b.png: {psnr:.3f} dB, SSIM {FLAT_SSIM:.4f}\n"
    )
    assert err.splitlines() == [
        "scoring 2 image(s) by matlab-rgb: the deblurring tables: 8-bit RGB, PSNR and MATLAB's 3-D SSIM",
        f"a.png: {psnr:.3f} dB, SSIM {FLAT_SSIM:.4f}",
        f"sub/b.png: {psnr:.3f} dB, SSIM {FLAT_SSIM:.4f}",
    ]


def test_json_to_stdout_moves_the_table_to_stderr(folders: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    restored, targets = folders
    _save(restored / "same.png", _flat(100))
    _save(targets / "same.png", _flat(100))
    code, out, err = _main(["derain", "--restored", str(restored), "--target", str(targets), "--json", "-", "-q"],
                           monkeypatch, capsys)
    assert code == 0
    document = json.loads(out)
    assert document["protocol"] == "matlab-y"
    assert document["count"] == 3
    assert document["psnr"] is None  # one identical pair: the mean is infinite, which JSON cannot hold
    # Grey 100 and 103 have Y 101.88 and 104.46, rounded to 102 and 104: 2 levels apart, not 3 * 219 / 255.
    luma_psnr = pytest.approx(20 * math.log10(255 / 2))
    assert [(image["name"], image["psnr"], image["seconds"]) for image in document["images"]] == [
        ("a.png", luma_psnr, None), ("same.png", None, None), ("sub/b.png", luma_psnr, None)]
    assert err.startswith("protocol  matlab-y: ")


def test_csv_and_json_files(folders: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    restored, targets = folders
    code, out, _ = _main(["deblur", "--restored", str(restored), "--target", str(targets), "--metric", "skimage",
                          "--csv", str(tmp_path / "scores.csv"), "--json", str(tmp_path / "scores.json")],
                         monkeypatch, capsys)
    assert code == 0
    assert out.startswith("protocol  skimage: ")
    rows = list(csv.DictReader(io.StringIO((tmp_path / "scores.csv").read_text())))
    assert [(row["name"], float(row["psnr"]), row["seconds"]) for row in rows] == [
        ("a.png", pytest.approx(20 * math.log10(255 / 3)), ""), ("sub/b.png", pytest.approx(20 * math.log10(255 / 3)), "")]
    assert json.loads((tmp_path / "scores.json").read_text())["ssim"] == pytest.approx(FLAT_SSIM)


def test_input_is_restored_and_scored_as_the_python_api_would(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Denoise scores unrounded floats (SIDD's protocol), so the restoration must stay float."""
    rng = np.random.default_rng(0)
    target = rng.integers(0, 256, (24, 32, 3))
    noisy = np.clip(target + rng.normal(0, 20, target.shape), 0, 255)
    _save(tmp_path / "in" / "x.png", noisy)
    _save(tmp_path / "gt" / "x.png", target)
    code, out, _ = _main(["denoise", "--input", str(tmp_path / "in"), "--target", str(tmp_path / "gt"), "--weights",
                          str(TINY_CHECKPOINT), "--precision", "fp32", "--json", "-", "-q"], monkeypatch, capsys)
    assert code == 0
    image = json.loads(out)["images"][0]
    restorer = Restorer.from_checkpoint(TINY_CHECKPOINT, device="cpu", precision="fp32")
    restored = restorer.restore(noisy.astype(np.uint8).astype(np.float32) / 255)
    psnr, ssim = PROTOCOLS["matlab-float"].score(restored, target / 255)
    assert (image["psnr"], image["ssim"]) == (pytest.approx(psnr, abs=1e-6), pytest.approx(ssim, abs=1e-6))
    assert image["seconds"] > 0
    rounded = PROTOCOLS["matlab-float"].score(np.rint(restored * 255) / 255, target / 255)[0]
    assert abs(rounded - psnr) > 1e-4  # rounding would have moved it


def test_python_api(folders: tuple[Path, Path], tmp_path: Path) -> None:
    restored, targets = folders
    result = evaluate.evaluate("deblur", str(targets), restored=str(restored))
    assert (result.count, result.psnr, result.ssim) == (2, pytest.approx(20 * math.log10(255 / 3)), pytest.approx(FLAT_SSIM))
    assert result.slowest() == []
    restorer = Restorer.from_checkpoint(TINY_CHECKPOINT, device="cpu", precision="fp32")
    timed = evaluate.evaluate("deblur", str(targets), inputs=str(restored), restorer=restorer, metric="skimage")
    assert [score.name for score in timed.slowest(1)] in (["a.png"], ["sub/b.png"])
    with pytest.raises(InputError, match="--metric psnr: expected one of auto, matlab-rgb"):
        evaluate.evaluate("deblur", str(targets), restored=str(restored), metric="psnr")


@pytest.mark.parametrize(
    ("arguments", "code", "message"),
    [
        (["--restored", "{restored}", "--target", "{tmp}/nowhere"], 2,
         "{tmp}/nowhere: no such file or directory (the target images)"),
        (["--restored", "{tmp}/empty", "--target", "{targets}"], 2, "{tmp}/empty: no images found (the restored images)"),
        (["--restored", "{restored}/a.png", "--target", "{targets}"], 2,
         "1 target(s) have no restored image of the same name in {restored}/a.png (first: sub/b.bmp); use "
         "--pair-by-order to pair the sorted lists"),
        (["--restored", "{restored}", "--target", "{targets}/a.png"], 2,
         "1 restored image(s) have no target of the same name in {targets}/a.png (first: sub/b.png); use "
         "--pair-by-order to pair the sorted lists"),
        (["--restored", "{restored}", "--target", "{targets}/a.png", "--pair-by-order"], 2,
         "2 restored images but 1 targets: pairing by order needs as many of each"),
        (["--restored", "{tmp}/small", "--target", "{targets}/a.png"], 2,
         "a.png: the restored image is 20x8 but its target {targets}/a.png is 20x16"),
        (["--restored", "{tmp}/small", "--target", "{tmp}/small", "--metric", "matlab-y"], 2,
         "a.png: 20x8 is too small for matlab-y, which needs sides of 11 pixels"),
        (["--restored", "{restored}", "--target", "{targets}", "--json", "{tmp}/no/such/folder.json"], 2,
         "--json {tmp}/no/such/folder.json: expected a file in an existing folder, or - for standard output"),
        (["--restored", "{restored}", "--target", "{targets}", "--metric", "lpips"], 2,
         "--metric lpips: expected one of auto, matlab-rgb, matlab-y, matlab-float, skimage"),
        (["--restored", "{dupes}", "--target", "{targets}"], 2,
         "a.jpg and a.png in {dupes} share a name: pairing by name cannot tell them apart (use --pair-by-order)"),
        (["--target", "{targets}"], 2, "Invalid value for '--input' / '--restored': give --input (images to restore) "
         "or --restored (finished outputs), not both (see `mprnet eval --help`)"),
        (["--restored", "{restored}", "--input", "{restored}", "--target", "{targets}"], 2,
         "Invalid value for '--input' / '--restored': give --input (images to restore) or --restored (finished "
         "outputs), not both (see `mprnet eval --help`)"),
        (["--restored", "{restored}", "--target", "{targets}", "--tlc"], 2,
         "Invalid value for '--restored': --tlc: for restoring with --input; --restored scores finished outputs "
         "as they are (see `mprnet eval --help`)"),
        (["--restored", "{restored}", "--target", "{targets}", "--tile", "512", "--precision", "fp16"], 2,
         "Invalid value for '--restored': --precision, --tile: for restoring with --input; --restored scores "
         "finished outputs as they are (see `mprnet eval --help`)"),
        (["--restored", "{restored}", "--target", "{targets}", "--json", "-", "--csv", "-"], 2,
         "Invalid value for '--json' / '--csv': only one of them can go to standard output (see `mprnet eval --help`)"),
        (["--input", "{restored}", "--target", "{targets}", "--ensemble", "3"], 2,
         "Invalid value for '--ensemble': 3: expected one of 1, 2, 4, 8 (see `mprnet eval --help`)"),
        (["--input", "{restored}", "--target", "{targets}", "--tlc-train-size", "100"], 2,
         "Invalid value for '--tlc-train-size': 100: expected a multiple of 8, as MPRNet's inputs are "
         "(see `mprnet eval --help`)"),
    ],
)
def test_errors_are_one_line(folders: tuple[Path, Path], tmp_path: Path, arguments: list[str], code: int, message: str,
                             monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    restored, targets = folders
    (tmp_path / "empty").mkdir()
    _save(tmp_path / "small" / "a.png", _flat(100, height=8))
    _save(tmp_path / "dupes" / "a.png", _flat(100))
    _save(tmp_path / "dupes" / "a.jpg", _flat(100))
    names = {"restored": restored, "targets": targets, "tmp": tmp_path, "dupes": tmp_path / "dupes"}
    arguments = [argument.format(**names) for argument in arguments]
    exit_code, out, err = _main(["deblur", *arguments], monkeypatch, capsys)
    assert (exit_code, out) == (code, "")
    assert err.splitlines()[-1:] == [f"error: {message.format(**names)}"]


def test_eight_bit_inputs_are_restored_in_the_precision_the_task_commands_use(
        folders: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Restored in float for the protocols, but an 8-bit file under precision auto still
    runs in bf16 where that is native, as `mprnet deblur` would run it."""
    monkeypatch.setattr("mprnet_cli.devices.cpu_has_native_bf16", lambda: True)
    restored, targets = folders

    def scores(precision: str) -> list[float]:
        restorer = Restorer.from_checkpoint(TINY_CHECKPOINT, device="cpu", precision=precision)
        result = evaluate.evaluate("deblur", str(targets), inputs=str(restored), restorer=restorer, metric="matlab-float")
        return [score.psnr for score in result.scores]

    auto, bf16, fp32 = scores("auto"), scores("bf16"), scores("fp32")
    assert auto == bf16 and auto != fp32


@pytest.mark.parametrize("command", ["eval", "task"])
def test_opencv_has_the_pixel_limit_in_eval_as_in_the_task_commands(command: str, tmp_path: Path) -> None:
    """OpenCV reads its guard's limit once, as it loads (`imageio.limit_decoders`). In a
    fresh process, the command decodes 16-bit PNGs (through OpenCV) under --max-pixels 1000;
    then an image of 1600 pixels must be refused by OpenCV's own guard."""
    import cv2

    sixteen_bit = np.full((16, 20, 3), 40000, dtype=np.uint16)
    for folder in ("restored", "targets"):
        (tmp_path / folder).mkdir()
        assert cv2.imwrite(str(tmp_path / folder / "a.png"), sixteen_bit)
    arguments = (["eval", "deblur", "--restored", str(tmp_path / "restored"), "--target", str(tmp_path / "targets")]
                 if command == "eval" else
                 ["deblur", str(tmp_path / "restored" / "a.png"), "-o", str(tmp_path / "out.png"), "--weights",
                  str(TINY_CHECKPOINT), "--precision", "fp32"])
    script = (
        "import sys\n"
        "import numpy as np\n"
        "from mprnet_cli.cli import main\n"
        f"sys.argv = ['mprnet', *{arguments!r}, '--max-pixels', '1000', '-q']\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as exit_status:\n"
        "    assert not exit_status.code, exit_status.code\n"
        "import cv2\n"
        "ok, png = cv2.imencode('.png', np.zeros((40, 40, 3), np.uint16))\n"
        "try:\n"
        "    cv2.imdecode(png, cv2.IMREAD_UNCHANGED)\n"
        "    print('decoded')\n"
        "except cv2.error as error:\n"
        "    print('refused' if 'CV_IO_MAX_IMAGE_PIXELS' in str(error) else error)\n"
    )
    environment = {name: value for name, value in os.environ.items() if name != "OPENCV_IO_MAX_IMAGE_PIXELS"}
    finished = subprocess.run([sys.executable, "-c", script], capture_output=True, env=environment, timeout=120)
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.decode().splitlines()[-1] == "refused"
