"""Planning jobs: where each result goes, and what is refused before any work starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from mprnet_cli.errors import CheckpointError, InputError, OutputError
from mprnet_cli.pipeline import Job, default_target, load_restorer, plan_jobs


@pytest.mark.parametrize(
    ("source", "task", "expected"),
    [
        ("photo.jpg", "deblur", "photo_deblurred.jpg"),
        ("a/b/frame.PNG", "derain", "a/b/frame_derained.PNG"),
        ("scan.tiff", "denoise", "scan_denoised.tiff"),
        ("anim.gif", "deblur", "anim_deblurred.png"),
    ],
)
def test_default_target(source: str, task: str, expected: str) -> None:
    assert default_target(Path(source), task) == Path(expected)


def test_plan_single_file(tmp_path: Path) -> None:
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"x")
    assert plan_jobs([str(photo)], None, "deblur") == [Job(str(photo), str(tmp_path / "photo_deblurred.jpg"))]
    assert plan_jobs([str(photo)], "-", "deblur") == [Job(str(photo), "-")]
    assert plan_jobs(["-"], None, "deblur") == [Job("-", "-")]


def test_plan_refusals(tmp_path: Path) -> None:
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"x")
    with pytest.raises(InputError, match="no input given"):
        plan_jobs([], None, "deblur")
    with pytest.raises(InputError, match="is a directory"):
        plan_jobs([str(tmp_path)], None, "deblur")
    with pytest.raises(OutputError, match="is a directory; give a file name"):
        (tmp_path / "out.png").mkdir()
        plan_jobs([str(photo)], str(tmp_path / "out.png"), "deblur")


def test_load_restorer_without_weights_says_what_to_do() -> None:
    with pytest.raises(CheckpointError, match="no checkpoint given: pass --weights PATH to the derain checkpoint"):
        load_restorer("derain", None, "cpu", "fp32")
