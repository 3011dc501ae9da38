"""Planning jobs (where each result goes, what is refused or skipped) and running them."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mprnet_cli import pipeline
from mprnet_cli.errors import InputError, MprnetError, OutputError
from mprnet_cli.imageio import Picture
from mprnet_cli.pipeline import Job, OutputNaming, default_target, normalise_extension, plan_jobs, run_jobs

from .conftest import PARITY, write_image


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """in/a.png, in/b.jpg, in/sub/c.webp, in/sub/deeper/d.tif, hidden and non-image files."""
    root = tmp_path / "in"
    write_image(root / "a.png")
    write_image(root / "b.jpg")
    write_image(root / "sub" / "c.webp")
    write_image(root / "sub" / "deeper" / "d.tif")
    write_image(root / "no_extension", fmt="PNG")
    write_image(root / ".hidden.png")
    (root / "notes.txt").write_text("not an image")
    return root


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


def test_single_file(tmp_path: Path) -> None:
    photo = write_image(tmp_path / "photo.jpg")
    assert plan_jobs([str(photo)], OutputNaming("deblur")).jobs == [Job(str(photo), str(tmp_path / "photo_deblurred.jpg"))]
    assert plan_jobs([str(photo)], OutputNaming("deblur", output="-")).jobs == [Job(str(photo), "-")]
    assert plan_jobs(["-"], OutputNaming("deblur")).jobs == [Job("-", "-")]
    assert plan_jobs(["-"], OutputNaming("deblur", output=str(tmp_path / "o.png"))).jobs == [Job("-", str(tmp_path / "o.png"))]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert plan_jobs([str(photo)], OutputNaming("deblur", output=str(out_dir))).jobs == [Job(str(photo), str(out_dir / "photo.jpg"))]


def test_directory_mirrors_structure_and_skips_hidden_and_non_images(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    plan = plan_jobs([str(tree)], OutputNaming("derain", output=str(out), recursive=True, extension=".png"))
    assert [(Path(j.source).relative_to(tree).as_posix(), Path(j.target).relative_to(out).as_posix()) for j in plan.jobs] == [
        ("a.png", "a.png"),
        ("b.jpg", "b.png"),
        ("no_extension", "no_extension.png"),
        ("sub/c.webp", "sub/c.png"),
        ("sub/deeper/d.tif", "sub/deeper/d.png"),
    ]
    assert sorted((Path(p).name, reason) for p, reason in plan.skipped) == [(".hidden.png", "hidden"), ("notes.txt", "not an image")]


def test_directory_without_recursion_takes_the_top_level_only(tree: Path, tmp_path: Path) -> None:
    plan = plan_jobs([str(tree)], OutputNaming("derain", output=str(tmp_path / "out")))
    assert [Path(j.source).name for j in plan.jobs] == ["a.png", "b.jpg", "no_extension"]
    assert [Path(j.target).name for j in plan.jobs] == ["a.png", "b.jpg", "no_extension.png"]


def test_globs_and_files_mixed_with_a_suffix(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    plan = plan_jobs([str(tree / "sub" / "*" / "*.tif"), str(tree / "a.png")], OutputNaming("deblur", output=str(out), suffix="_x"))
    assert [j.target for j in plan.jobs] == [str(out / "deeper" / "d_x.tif"), str(out / "a_x.png")]


def test_an_existing_file_with_glob_characters_in_its_name_is_that_file(tmp_path: Path) -> None:
    bracketed = write_image(tmp_path / "photo[1].png")
    write_image(tmp_path / "photo1.png")  # what `photo[1].png` would match as a pattern
    plan = plan_jobs([str(bracketed)], OutputNaming("deblur"))
    assert plan.jobs == [Job(str(bracketed), str(tmp_path / "photo[1]_deblurred.png"))]


def test_a_broken_link_in_a_folder_is_reported(tree: Path, tmp_path: Path) -> None:
    (tree / "gone.png").symlink_to(tree / "missing.png")
    plan = plan_jobs([str(tree)], OutputNaming("derain", output=str(tmp_path / "out")))
    assert (str(tree / "gone.png"), "a broken link") in plan.skipped
    assert [Path(j.source).name for j in plan.jobs] == ["a.png", "b.jpg", "no_extension"]


def test_a_glob_decides_about_hidden_files_itself(tree: Path, tmp_path: Path) -> None:
    """`*` leaves them out, as the shell's does; `.*` asks for them."""
    out = str(tmp_path / "out")
    assert ".hidden.png" not in [Path(j.source).name for j in plan_jobs([str(tree / "*.png")], OutputNaming("deblur", output=out)).jobs]
    plan = plan_jobs([str(tree / ".*.png")], OutputNaming("deblur", output=out))
    assert [Path(j.source).name for j in plan.jobs] == [".hidden.png"] and plan.skipped == []


def test_a_failed_write_leaves_no_folder_it_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(path: Path, data: bytes) -> None:
        raise OutputError(f"{path}: cannot write (No space left on device)")

    monkeypatch.setattr(pipeline, "write_atomic", disk_full)
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputError):
        pipeline.write_target(Picture(np.zeros((4, 4, 3), dtype=np.uint8)), str(tmp_path / "out" / "a" / "b" / "x.png"), "PNG", 95)
    assert list(tmp_path.iterdir()) == [tmp_path / "out"] and list((tmp_path / "out").iterdir()) == []


def test_a_path_that_may_not_be_looked_into_is_one_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As for a user who may not enter a folder on the way to -o (root may, so it is simulated)."""
    photo = write_image(tmp_path / "photo.png")
    locked = tmp_path / "locked"
    real_is_dir = Path.is_dir

    def is_dir(path: Path) -> bool:
        if locked in (path, *path.parents):
            raise PermissionError(13, "Permission denied", str(path))
        return real_is_dir(path)

    monkeypatch.setattr(Path, "is_dir", is_dir)
    with pytest.raises(MprnetError) as error:
        plan_jobs([str(photo)], OutputNaming("deblur", output=f"{locked}/sub/"))
    assert error.value.message == f"{locked}/sub: Permission denied"


def test_a_write_that_fails_for_any_reason_leaves_no_folder_it_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(path: Path, data: bytes) -> None:
        raise MemoryError

    monkeypatch.setattr(pipeline, "write_atomic", interrupted)
    with pytest.raises(MemoryError):
        pipeline.write_target(Picture(np.zeros((4, 4, 3), dtype=np.uint8)), str(tmp_path / "a" / "x.png"), "PNG", 95)
    assert list(tmp_path.iterdir()) == []


def test_without_output_results_go_beside_inputs(tree: Path) -> None:
    plan = plan_jobs([str(tree / "a.png"), str(tree / "b.jpg")], OutputNaming("denoise"))
    assert [j.target for j in plan.jobs] == [str(tree / "a_denoised.png"), str(tree / "b_denoised.jpg")]


def test_found_files_that_share_an_output_keep_their_source_extension(tmp_path: Path) -> None:
    for name in ("x.png", "x.jpg", "x.jp2", "y.jp2"):
        write_image(tmp_path / "in" / name)
    naming = OutputNaming("deblur", output=str(tmp_path / "out"), extension=".png")
    plan = plan_jobs([str(tmp_path / "in")], naming)
    out = tmp_path / "out"
    assert {Path(job.source).name: job.target for job in plan.jobs} == {
        "x.jp2": str(out / "x.jp2.png"), "x.jpg": str(out / "x.jpg.png"), "x.png": str(out / "x.png.png"),
        "y.jp2": str(out / "y.png"),
    }
    assert sorted(Path(job.source).name for job in plan.renamed) == ["x.jp2", "x.jpg", "x.png"]
    # The same names on a rerun, so that the outputs written are skipped.
    for job in plan.jobs:
        write_image(Path(job.target))
    rerun = plan_jobs([str(tmp_path / "in")], naming)
    assert rerun.jobs == [] and len(rerun.skipped) == 4


def test_a_file_added_beside_one_restored_before_is_not_taken_for_done(tmp_path: Path) -> None:
    """a.ppm alone was restored as a_deblurred.png; with a.png added, that file is neither
    a.png's result nor an input."""
    write_image(tmp_path / "a.ppm")
    write_image(tmp_path / "a_deblurred.png")  # the first run's output
    write_image(tmp_path / "a.png")
    plan = plan_jobs([str(tmp_path)], OutputNaming("deblur"))
    assert sorted((Path(job.source).name, Path(job.target).name) for job in plan.jobs) == [
        ("a.png", "a.png_deblurred.png"), ("a.ppm", "a.ppm_deblurred.png"), ("a_deblurred.png", "a_deblurred_deblurred.png")]


def test_files_of_one_name_in_two_folders_are_refused_under_their_own_name(tmp_path: Path) -> None:
    one, two = write_image(tmp_path / "d1" / "a.png"), write_image(tmp_path / "d2" / "a.png")
    with pytest.raises(OutputError) as error:
        plan_jobs([str(tmp_path / "d1"), str(tmp_path / "d2")], OutputNaming("deblur", output=str(tmp_path / "out")))
    assert error.value.message.startswith(f"{one} and {two} would both be written to {tmp_path / 'out' / 'a.png'};")


def test_found_files_of_one_format_clashing_all_keep_their_extension(tmp_path: Path) -> None:
    write_image(tmp_path / "in" / "a.jp2")
    write_image(tmp_path / "in" / "a.j2k")
    plan = plan_jobs([str(tmp_path / "in")], OutputNaming("denoise"))
    assert sorted(job.target for job in plan.jobs) == [str(tmp_path / "in" / "a.j2k_denoised.png"),
                                                       str(tmp_path / "in" / "a.jp2_denoised.png")]


def test_named_files_that_share_an_output_are_refused_before_any_work(tmp_path: Path) -> None:
    png, jpg = write_image(tmp_path / "in" / "x.png"), write_image(tmp_path / "in" / "x.jpg")
    with pytest.raises(OutputError) as error:
        plan_jobs([str(png), str(jpg)], OutputNaming("deblur", output=str(tmp_path / "out"), extension=".png"))
    assert error.value.message == (
        f"{png} and {jpg} would both be written to {tmp_path / 'out' / 'x.png'}; "
        "rename one, or restore them in separate runs"
    )


def test_existing_outputs_are_skipped_unless_overwrite(tree: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_image(out / "a.png")
    plan = plan_jobs([str(tree)], OutputNaming("deblur", output=str(out)))
    assert [Path(j.source).name for j in plan.jobs] == ["b.jpg", "no_extension"]
    assert (str(tree / "a.png"), f"{out / 'a.png'} exists (use --overwrite to redo it)") in plan.skipped
    assert len(plan_jobs([str(tree)], OutputNaming("deblur", output=str(out), overwrite=True)).jobs) == 3


@pytest.mark.parametrize(
    ("inputs", "naming", "error", "message"),
    [
        ([], OutputNaming("deblur"), InputError, "no input given"),
        (["-", "a.png"], OutputNaming("deblur"), InputError, "`-` (standard input) cannot be mixed with other inputs"),
        (["missing.png"], OutputNaming("deblur"), InputError, "missing.png: no such file or directory"),
    ],
)
def test_refusals(inputs: list[str], naming: OutputNaming, error: type[Exception], message: str) -> None:
    with pytest.raises(error) as raised:
        plan_jobs(inputs, naming)
    assert raised.value.message == message  # type: ignore[attr-defined]


def test_batch_refusals(tree: Path, tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="-o - writes one image to standard output"):
        plan_jobs([str(tree)], OutputNaming("deblur", output="-"))
    a_file = write_image(tmp_path / "file.png")
    with pytest.raises(OutputError, match="is a file; with several inputs or a directory, -o must be a directory"):
        plan_jobs([str(tree)], OutputNaming("deblur", output=str(a_file)))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no images or videos found in"):
        plan_jobs([str(empty)], OutputNaming("deblur"))
    photo = write_image(tmp_path / "p.png")
    with pytest.raises(OutputError, match="refusing to overwrite the input"):
        plan_jobs([str(photo)], OutputNaming("deblur", suffix=""))


def test_a_file_name_for_several_inputs_is_refused(tree: Path, tmp_path: Path) -> None:
    photo = write_image(tmp_path / "p.png")
    with pytest.raises(OutputError, match=r"single.png: several inputs need an output directory, not a file name "
                                          r"\(for a directory of that name, write .*single.png/\)"):
        plan_jobs([str(photo), str(tree / "a.png")], OutputNaming("deblur", output=str(tmp_path / "single.png")))
    as_folder = OutputNaming("deblur", output=str(tmp_path / "single.png") + "/")
    plan = plan_jobs([str(photo), str(tree / "a.png")], as_folder)
    assert [Path(job.target).parent.name for job in plan.jobs] == ["single.png"] * 2


@pytest.mark.parametrize("overwrite", [False, True])
def test_the_outputs_of_an_earlier_run_are_not_restored_again(tmp_path: Path, overwrite: bool) -> None:
    """Run twice on a folder, outputs beside inputs: the second run sees the first's outputs."""
    first, earlier_output = write_image(tmp_path / "a.png"), write_image(tmp_path / "a_deblurred.png")
    plan = plan_jobs([str(tmp_path)], OutputNaming("deblur", overwrite=overwrite))
    assert plan.jobs == ([Job(str(first), str(earlier_output))] if overwrite else [])
    assert (str(earlier_output), f"it is the output of {first}") in plan.skipped


def test_an_input_named_twice_is_restored_once(tmp_path: Path) -> None:
    photo = write_image(tmp_path / "p.png")
    (tmp_path / "sub").mkdir()
    again = f"{tmp_path}/sub/../p.png"
    plan = plan_jobs([str(photo), again], OutputNaming("deblur", output=str(tmp_path / "out")))
    assert plan.jobs == [Job(str(photo), str(tmp_path / "out" / "p.png"))]
    assert plan.skipped == [(again, "named more than once")]


def test_a_link_in_a_folder_is_restored_under_its_own_name(tmp_path: Path) -> None:
    write_image(tmp_path / "in" / "x.png")
    (tmp_path / "in" / "y.png").symlink_to("x.png")
    plan = plan_jobs([str(tmp_path / "in")], OutputNaming("deblur", output=str(tmp_path / "out")))
    assert [Path(job.target).name for job in plan.jobs] == ["x.png", "y.png"]


def test_standard_input_needs_an_output_file_name(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match=r"out/: one image from standard input needs an output file name, or -o -$"):
        plan_jobs(["-"], OutputNaming("deblur", output=str(tmp_path / "out") + "/"))
    with pytest.raises(OutputError, match="^--ext png contradicts -o o.jpg; drop one of them$"):
        plan_jobs(["-"], OutputNaming("deblur", output="o.jpg", extension=".png"))


def test_an_extension_that_contradicts_the_output_file_is_refused(tmp_path: Path) -> None:
    photo = write_image(tmp_path / "p.png")
    with pytest.raises(OutputError, match="^--ext jpg contradicts -o o.png; drop one of them$"):
        plan_jobs([str(photo)], OutputNaming("deblur", output="o.png", extension=".jpg"))
    same_format = OutputNaming("deblur", output="o.jpeg", extension=".jpg")
    assert plan_jobs([str(photo)], same_format).jobs == [Job(str(photo), "o.jpeg")]


def test_extension_option() -> None:
    assert [normalise_extension(e) for e in (None, "auto", "png", ".JPG", "tiff")] == [None, None, ".png", ".jpg", ".tiff"]
    with pytest.raises(OutputError, match="--ext gif: not a format mprnet writes; use one of bmp, jpeg"):
        normalise_extension("gif")


class _Doubler:
    """Stands in for a Restorer: fast, and its output is checkable."""

    def restore_array(self, array: np.ndarray, progress: object = None) -> np.ndarray:
        return (array // 2).astype(array.dtype)


def test_run_jobs_reports_each_job_and_goes_on_after_failures(tmp_path: Path) -> None:
    good = [write_image(tmp_path / f"{i}.png") for i in range(3)]
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes((PARITY / "input_64x48.png").read_bytes()[:300])
    sources = [good[0], empty, good[1], corrupt, good[2]]
    jobs = [Job(str(s), str(tmp_path / "out" / f"{s.stem}.png")) for s in sources]
    started: list[str] = []
    outcomes = list(run_jobs(_Doubler(), jobs, on_start=lambda job: started.append(job.source)))  # type: ignore[arg-type]
    assert sorted((Path(o.job.source).name, o.ok) for o in outcomes) == sorted(
        [("0.png", True), ("empty.png", False), ("1.png", True), ("corrupt.png", False), ("2.png", True)]
    )
    errors = {Path(o.job.source).name: o.error.message for o in outcomes if o.error}
    assert errors == {
        "empty.png": f"{empty}: empty file, not an image",
        "corrupt.png": errors["corrupt.png"],
    }
    assert errors["corrupt.png"].startswith(f"{corrupt}: truncated or corrupt image")
    assert started == [str(p) for p in good]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0.png", "1.png", "2.png"]
    assert (np.asarray(Image.open(tmp_path / "out" / "0.png")) == 45).all()


def test_each_image_is_reported_before_the_next_one_is_computed(tmp_path: Path) -> None:
    events: list[str] = []

    class _Slow:
        def restore_array(self, array: np.ndarray, progress: object = None) -> np.ndarray:
            events.append("compute")
            time.sleep(1.0)  # the writer gets up to 5% of this to deliver the outcome
            return array

    sources = [write_image(tmp_path / f"{i}.png") for i in range(2)]
    jobs = [Job(str(s), str(tmp_path / "out" / s.name)) for s in sources]
    for outcome in run_jobs(_Slow(), jobs, on_start=lambda job: events.append("start")):  # type: ignore[arg-type]
        assert outcome.ok
        events.append("done")
    assert events == ["start", "compute", "done"] * 2


def test_an_images_time_leaves_out_its_wait_in_the_queue(tmp_path: Path) -> None:
    class _Slow:
        def restore_array(self, array: np.ndarray, progress: object = None) -> np.ndarray:
            time.sleep(0.5)
            return array

    sources = [write_image(tmp_path / f"{i}.png") for i in range(3)]
    jobs = [Job(str(s), str(tmp_path / "out" / s.name)) for s in sources]
    seconds = [outcome.seconds for outcome in run_jobs(_Slow(), jobs)]  # type: ignore[arg-type]
    # Each image took 0.5 s of compute; the third waited 1 s for the first two before that.
    assert all(0.5 <= s < 0.9 for s in seconds), seconds


def test_stopping_early_writes_what_was_restored_and_leaves_no_partial_file(tmp_path: Path) -> None:
    sources = [write_image(tmp_path / "in" / f"{i}.png") for i in range(6)]
    out = tmp_path / "out"
    outcomes = run_jobs(_Doubler(), [Job(str(s), str(out / s.name)) for s in sources])  # type: ignore[arg-type]
    first = next(outcomes)
    outcomes.close()
    written = sorted(p.name for p in out.iterdir())
    assert first.ok and 1 <= len(written) < 6
    assert all(not name.startswith(".") for name in written)
    for name in written:
        assert (np.asarray(Image.open(out / name)) == 45).all()


def test_unwritable_output_directory_fails_each_job(tmp_path: Path) -> None:
    source = write_image(tmp_path / "a.png")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a directory should be")
    [outcome] = run_jobs(_Doubler(), [Job(str(source), str(blocker / "sub" / "a.png"))])  # type: ignore[arg-type]
    assert outcome.error is not None
    assert outcome.error.message.startswith(f"{blocker / 'sub'}: cannot create the output directory")


def test_image_over_the_pixel_limit_fails_that_job(tmp_path: Path) -> None:
    source = write_image(tmp_path / "big.png", 100, 100)
    [outcome] = run_jobs(_Doubler(), [Job(str(source), str(tmp_path / "o.png"))], max_pixels=9999)  # type: ignore[arg-type]
    assert outcome.error is not None and "over the 9,999-pixel limit" in outcome.error.message


def test_an_image_the_encoder_refuses_fails_that_job_and_the_batch_goes_on(tmp_path: Path) -> None:
    wide, small = write_image(tmp_path / "wide.png", 16400, 2), write_image(tmp_path / "small.png")
    jobs = [Job(str(source), str(tmp_path / "out" / f"{source.stem}.webp")) for source in (wide, small)]
    outcomes = {Path(o.job.source).name: o for o in run_jobs(_Doubler(), jobs)}  # type: ignore[arg-type]
    assert outcomes["small.png"].ok
    assert outcomes["wide.png"].error is not None
    assert outcomes["wide.png"].error.message.startswith(f"{tmp_path / 'out' / 'wide.webp'}: cannot encode as WEBP (")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["small.webp"]


def test_an_unexpected_error_in_the_writer_fails_that_job_and_the_batch_goes_on(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer thread must not die: the batch would stall on its full queue."""
    write = pipeline.write_target

    def flaky(picture: Picture, target: str, *args: object) -> None:
        if target.endswith("1.png"):
            raise RuntimeError("a bug")
        write(picture, target, *args)

    monkeypatch.setattr(pipeline, "write_target", flaky)
    sources = [write_image(tmp_path / f"{i}.png") for i in range(6)]
    jobs = [Job(str(s), str(tmp_path / "out" / s.name)) for s in sources]
    errors = [o.error.message for o in run_jobs(_Doubler(), jobs) if o.error]  # type: ignore[arg-type]
    assert errors == [f"{tmp_path / 'out' / '1.png'}: cannot write (RuntimeError: a bug)"]
    assert len(list((tmp_path / "out").iterdir())) == 5


def _stdout_job(tmp_path: Path) -> list[Job]:
    return [Job(str(write_image(tmp_path / "p.png")), pipeline.STDIO)]


class _Stdout:
    """What the pipeline uses of `sys.stdout`: its binary stream (here unbuffered)."""

    def __init__(self, stream: object) -> None:
        self.buffer = stream


def test_a_closed_pipe_on_stdout_fails_the_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reading, writing = os.pipe()
    os.close(reading)
    with open(writing, "wb", buffering=0) as closed_pipe:
        monkeypatch.setattr(sys, "stdout", _Stdout(closed_pipe))
        [outcome] = run_jobs(_Doubler(), _stdout_job(tmp_path))  # type: ignore[arg-type]
    assert outcome.error is not None
    assert outcome.error.message == "stdout: the reading end of the pipe closed before the image was written"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_or_closed_stdout_fails_the_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with open("/dev/full", "wb", buffering=0) as full:
        monkeypatch.setattr(sys, "stdout", _Stdout(full))
        [outcome] = run_jobs(_Doubler(), _stdout_job(tmp_path))  # type: ignore[arg-type]
    assert outcome.error is not None and outcome.error.message == "stdout: cannot write (No space left on device)"
    monkeypatch.setattr(sys, "stdout", None)
    [outcome] = run_jobs(_Doubler(), _stdout_job(tmp_path))  # type: ignore[arg-type]
    assert outcome.error is not None
    assert outcome.error.message == "standard output is closed; give -o a file or a directory"
