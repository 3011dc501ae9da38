"""Object-store paths: planning on fsspec's in-memory store, and whole batches against a
real S3 protocol server (moto's, on 127.0.0.1) through s3fs, as a user's bucket is used."""

from __future__ import annotations

import importlib
import io
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mprnet_cli import storage
from mprnet_cli.cli import app
from mprnet_cli.errors import InputError, OutputError
from mprnet_cli.imageio import Picture
from mprnet_cli.pipeline import Job, OutputNaming, plan_jobs, read_source, write_target

from .conftest import TINY_CHECKPOINT, pil_bytes, write_image

runner = CliRunner()
WEIGHTS = ["--weights", str(TINY_CHECKPOINT), "--device", "cpu"]


def _png(seed: int, size: tuple[int, int] = (20, 16)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return pil_bytes(Image.fromarray(pixels))


@pytest.mark.parametrize(("path", "expected"), [
    ("s3://bucket/rainy", True), ("gs://b/x.png", True), ("memory://x", True), ("abfs://c/d", True),
    ("C:\\photos\\a.png", False), ("C://photos", False), ("photo.png", False), ("./s3://b", False), ("-", False),
])
def test_is_uri(path: str, expected: bool) -> None:
    assert storage.is_uri(path) is expected


@pytest.fixture
def memory() -> Iterator[str]:
    """A fresh folder on fsspec's process-wide in-memory store."""
    fs = fsspec.filesystem("memory")
    root = f"memory://mprnet-{uuid.uuid4().hex[:8]}"
    yield root
    fs.rm(root.split("://", 1)[1], recursive=True)


def _put(uri: str, data: bytes) -> None:
    fs, path = fsspec.url_to_fs(uri)
    fs.pipe_file(path, data)


def _objects(root: str) -> list[str]:
    return sorted(storage.list_folder(root).files)


def test_planning_a_store_folder_mirrors_it_and_skips_as_a_local_folder_does(memory: str) -> None:
    for name in ("a.png", "b.jpg", "trip/c.png", "trip/day2/d.tif", ".thumbs/e.png", "f/../../g.png", "/h.png"):
        _put(f"{memory}/in/{name}", b"never read")
    _put(f"{memory}/in/notes.txt", b"not a picture")
    _put(f"{memory}/in/noextension", _png(1))  # an image, but a store's objects are never sniffed
    plan = plan_jobs([f"{memory}/in"], OutputNaming("derain", output=f"{memory}/out", recursive=True))
    assert plan.batch
    assert [(job.source, job.target) for job in plan.jobs] == [
        (f"{memory}/in/a.png", f"{memory}/out/a.png"),
        (f"{memory}/in/b.jpg", f"{memory}/out/b.jpg"),
        (f"{memory}/in/trip/c.png", f"{memory}/out/trip/c.png"),
        (f"{memory}/in/trip/day2/d.tif", f"{memory}/out/trip/day2/d.tif"),
    ]
    unsafe = "an empty or `..` part in its name, which no folder can mirror"
    assert sorted(plan.skipped) == sorted([(f"{memory}/in//h.png", unsafe), (f"{memory}/in/.thumbs/e.png", "hidden"),
                                           (f"{memory}/in/f/../../g.png", unsafe),
                                           (f"{memory}/in/noextension", "not an image"),
                                           (f"{memory}/in/notes.txt", "not an image")])
    flat = plan_jobs([f"{memory}/in/"], OutputNaming("derain", suffix="_clean", extension=".webp"))
    assert [job.target for job in flat.jobs] == [f"{memory}/in/a_clean.webp", f"{memory}/in/b_clean.webp"]


def test_planning_a_store_glob_mirrors_below_its_literal_folders(memory: str) -> None:
    for name in ("2024/a.png", "2024/b.jpg", "2025/c.png", "2025/deep/d.png", "2025/.e.png"):
        _put(f"{memory}/shots/{name}", b"x")
    plan = plan_jobs([f"{memory}/shots/*/*.png"], OutputNaming("deblur", output=f"{memory}/out"))
    assert [(job.source, job.target) for job in plan.jobs] == [
        (f"{memory}/shots/2024/a.png", f"{memory}/out/2024/a.png"),
        (f"{memory}/shots/2025/c.png", f"{memory}/out/2025/c.png"),
    ]
    assert plan.skipped == [(f"{memory}/shots/2025/.e.png", "hidden")]
    deep = plan_jobs([f"{memory}/shots/**/*.png"], OutputNaming("deblur", output=f"{memory}/out", recursive=True))
    assert [job.target for job in deep.jobs] == [f"{memory}/out/2024/a.png", f"{memory}/out/2025/c.png",
                                                 f"{memory}/out/2025/deep/d.png"]
    with pytest.raises(InputError, match="cannot match bucket names"):
        plan_jobs(["s3://bucket-*/x.png"], OutputNaming("deblur"))


def test_planning_skips_outputs_the_listings_saw_and_clashes_keep_their_extensions(memory: str) -> None:
    for name in ("a.png", "a.jpg", "b.png", "c.png"):
        _put(f"{memory}/in/{name}", b"x")
    _put(f"{memory}/out/b.png", b"done before")
    _put(f"{memory}/in/c_derained.png", b"done before, beside its input")
    naming = OutputNaming("derain", output=f"{memory}/out", extension=".png")
    plan = plan_jobs([f"{memory}/in"], naming)
    assert [job.target for job in plan.jobs] == [f"{memory}/out/a.jpg.png", f"{memory}/out/a.png.png",
                                                 f"{memory}/out/c.png", f"{memory}/out/c_derained.png"]
    assert [job.target for job in plan.renamed] == [f"{memory}/out/a.jpg.png", f"{memory}/out/a.png.png"]
    assert plan.skipped == [(f"{memory}/in/b.png", f"{memory}/out/b.png exists (use --overwrite to redo it)")]
    again = plan_jobs([f"{memory}/in"], OutputNaming("derain", output=f"{memory}/out", extension=".png", overwrite=True))
    assert len(again.jobs) == 5
    beside = plan_jobs([f"{memory}/in/*.png"], OutputNaming("derain"))
    assert [job.source for job in beside.jobs] == [f"{memory}/in/a.png", f"{memory}/in/b.png"]
    assert beside.skipped == [(f"{memory}/in/c.png", f"{memory}/in/c_derained.png exists (use --overwrite to redo it)"),
                              (f"{memory}/in/c_derained.png", f"it is the output of {memory}/in/c.png")]


def test_planning_lists_each_place_once_and_never_reads_an_object(memory: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    for index in range(6):
        _put(f"{memory}/in/{index}.png", b"x")
    for index in (1, 3, 5):
        _put(f"{memory}/out/{index}.png", b"done before")
    fs = fsspec.filesystem("memory")
    calls: list[str] = []
    for method in ("find", "ls", "info", "exists", "isfile", "isdir", "cat_file", "open"):
        original = getattr(fs, method)
        monkeypatch.setattr(fs, method, lambda *args, _name=method, _original=original, **kwargs:
                            (calls.append(_name), _original(*args, **kwargs))[1])
    plan = plan_jobs([f"{memory}/in"], OutputNaming("denoise", output=f"{memory}/out"))
    assert len(plan.jobs) == 3 and len(plan.skipped) == 3
    assert calls.count("find") == 2  # the input folder and the output folder
    assert not {"cat_file", "open", "isfile", "exists"} & set(calls)


def test_one_named_object_and_its_output(memory: str, tmp_path: Path) -> None:
    _put(f"{memory}/a.png", b"x")
    assert plan_jobs([f"{memory}/a.png"], OutputNaming("deblur")).jobs == [
        Job(f"{memory}/a.png", f"{memory}/a_deblurred.png")]
    plan = plan_jobs([f"{memory}/a.png", f"{memory}/a.png"], OutputNaming("deblur", output=f"{memory}/out"))
    assert plan.jobs == [Job(f"{memory}/a.png", f"{memory}/out/a.png")]
    assert plan.skipped == [(f"{memory}/a.png", "named more than once")]
    with pytest.raises(InputError, match=f"^{memory}/missing.png: no such file or directory$"):
        plan_jobs([f"{memory}/missing.png"], OutputNaming("deblur"))
    with pytest.raises(OutputError, match="no extension to choose the output format by .*write memory://.*/new/$"):
        plan_jobs([f"{memory}/a.png"], OutputNaming("deblur", output=f"{memory}/new"))
    with pytest.raises(OutputError, match="several inputs need an output directory"):
        plan_jobs([f"{memory}/a.png", str(write_image(tmp_path / "b.png"))], OutputNaming("deblur", output=f"{memory}/x.png"))
    _put(f"{memory}/only/sub/a.png", b"x")
    with pytest.raises(InputError, match=f"^no images or videos found in {memory}/only$"):  # there, but not without -r
        plan_jobs([f"{memory}/only"], OutputNaming("deblur"))


def test_read_source_and_write_target_on_a_store(memory: str) -> None:
    _put(f"{memory}/in.png", _png(3))
    picture = read_source(f"{memory}/in.png", None)
    assert picture.pixels.shape == (16, 20, 3)
    write_target(picture, f"{memory}/deep/out.png", "PNG", 95)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(storage.read_bytes(f"{memory}/deep/out.png")))),
                          picture.pixels)
    with pytest.raises(InputError, match=f"^{memory}/nothing.png: no such object or bucket$"):
        read_source(f"{memory}/nothing.png", None)
    with pytest.raises(OutputError, match="unknown output format"):
        write_target(picture, f"{memory}/out.xyz", "PNG", 95)


def test_standard_input_to_a_store(memory: str) -> None:
    result = runner.invoke(app, ["denoise", "-", "-o", f"{memory}/from_stdin.png", *WEIGHTS], input=_png(4))
    assert result.exit_code == 0, result.stderr
    assert Image.open(io.BytesIO(storage.read_bytes(f"{memory}/from_stdin.png"))).size == (20, 16)
    refused = runner.invoke(app, ["denoise", "-", "-o", f"{memory}/folder/", *WEIGHTS], input=_png(4))
    assert refused.exit_code == 2
    assert refused.stderr == f"error: {memory}/folder/: one image from standard input needs an output file name, or -o -\n"


def test_a_store_without_its_package_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    registry = importlib.import_module("fsspec.registry")
    monkeypatch.setitem(sys.modules, "s3fs", None)
    monkeypatch.delitem(registry._registry, "s3", raising=False)  # forget an s3fs imported before
    with pytest.raises(InputError) as caught:
        plan_jobs(["s3://b/rainy"], OutputNaming("derain"))
    assert caught.value.message == "s3://b/rainy: reading s3:// needs s3fs (pip install 'mprnet[s3]')"
    with pytest.raises(OutputError, match=r"^s3://b/x.png: writing s3:// needs s3fs \(pip install 'mprnet\[s3\]'\)$"):
        write_target(Picture(np.zeros((2, 2, 3), np.uint8)), "s3://b/x.png", "PNG", 95)
    with pytest.raises(InputError, match=r"^nope://b/x: not a path mprnet can use \(Protocol not known: nope\)$"):
        plan_jobs(["nope://b/x"], OutputNaming("derain"))


# --- A real S3 protocol server -------------------------------------------------------------

@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    pytest.importorskip("s3fs", reason="object-store tests need s3fs: pip install 'mprnet[s3]'")
    moto_server = pytest.importorskip("moto.server", reason="S3 tests need moto's server: pip install 'moto[server]'")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A new bucket on the server, reached as a user reaches theirs: through the AWS variables."""
    import s3fs

    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3_server}.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    s3fs.S3FileSystem.clear_instance_cache()  # one made under other variables would keep them
    name = f"mprnet-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem().mkdir(name)
    return f"s3://{name}"


def _local_folder(root: Path) -> Path:
    for index, name in enumerate(["a.png", "b.jpg", "trip/c.png", "trip/day2/d.tif"]):
        write_image(root / name, 20 + index, 16, noise=True)
    return root


def _upload(folder: Path, uri: str) -> None:
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        _put(f"{uri}/{path.relative_to(folder).as_posix()}", path.read_bytes())


def test_a_bucket_folder_restored_to_a_bucket_matches_the_local_batch(bucket: str, tmp_path: Path) -> None:
    local = _local_folder(tmp_path / "in")
    _upload(local, f"{bucket}/rainy")
    expected = runner.invoke(app, ["derain", str(local), "-r", "-o", str(tmp_path / "out"), *WEIGHTS])
    assert expected.exit_code == 0, expected.stderr

    result = runner.invoke(app, ["derain", f"{bucket}/rainy", "-r", "-o", f"{bucket}/clean", *WEIGHTS])
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    names = ["a.png", "b.jpg", "trip/c.png", "trip/day2/d.tif"]
    assert _objects(f"{bucket}/clean") == [f"{bucket}/clean/{name}" for name in names]
    for name in names:
        data = storage.read_bytes(f"{bucket}/clean/{name}")
        assert data == (tmp_path / "out" / name).read_bytes(), name
        assert Image.open(io.BytesIO(data)).size == Image.open(local / name).size
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"{bucket}/rainy/a.png -> {bucket}/clean/a.png (0.00 MP, ")
    assert lines[-1].startswith("4 done, 0 skipped, 0 failed; ")

    rerun = runner.invoke(app, ["derain", f"{bucket}/rainy", "-r", "-o", f"{bucket}/clean", *WEIGHTS])
    assert rerun.exit_code == 0, rerun.stderr
    assert "nothing to do: every output exists (use --overwrite to redo them)" in rerun.stderr
    _put(f"{bucket}/clean/a.png", b"stale")
    redo = runner.invoke(app, ["derain", f"{bucket}/rainy/a.png", "-o", f"{bucket}/clean/a.png", "--overwrite",
                               *WEIGHTS])
    assert redo.exit_code == 0, redo.stderr
    assert storage.read_bytes(f"{bucket}/clean/a.png") == (tmp_path / "out" / "a.png").read_bytes()


def test_a_corrupt_object_fails_alone(bucket: str) -> None:
    _put(f"{bucket}/in/a.png", _png(1))
    _put(f"{bucket}/in/b_corrupt.png", b"\x89PNG\r\n\x1a\n" + bytes(40))
    _put(f"{bucket}/in/c.png", _png(2))
    result = runner.invoke(app, ["denoise", f"{bucket}/in", "-o", f"{bucket}/out/", *WEIGHTS])
    assert result.exit_code == 1
    assert _objects(f"{bucket}/out") == [f"{bucket}/out/a.png", f"{bucket}/out/c.png"]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {bucket}/in/b_corrupt.png: truncated or corrupt image (its header is unreadable)"]
    assert result.stderr.splitlines()[-1].startswith("2 done, 0 skipped, 1 failed; ")


def test_between_a_bucket_and_local_folders(bucket: str, tmp_path: Path) -> None:
    local = _local_folder(tmp_path / "in")
    _upload(local, f"{bucket}/in")
    down = runner.invoke(app, ["deblur", f"{bucket}/in/trip", "-r", "-o", str(tmp_path / "down"), "--ext", "png",
                               *WEIGHTS])
    assert down.exit_code == 0, down.stderr
    assert sorted(p.relative_to(tmp_path / "down").as_posix() for p in (tmp_path / "down").rglob("*.png")) == [
        "c.png", "day2/d.png"]
    up = runner.invoke(app, ["deblur", str(local / "trip"), "-r", "-o", f"{bucket}/up", "--ext", "png", *WEIGHTS])
    assert up.exit_code == 0, up.stderr
    assert _objects(f"{bucket}/up") == [f"{bucket}/up/c.png", f"{bucket}/up/day2/d.png"]
    for name in ("c.png", "day2/d.png"):
        assert storage.read_bytes(f"{bucket}/up/{name}") == (tmp_path / "down" / name).read_bytes()


@pytest.mark.parametrize("where", ["input", "output"])
def test_a_missing_bucket_is_one_line(bucket: str, tmp_path: Path, where: str) -> None:
    missing = f"s3://mprnet-missing-{uuid.uuid4().hex[:8]}/photos"
    args = [missing] if where == "input" else [str(write_image(tmp_path / "a.png")), "-o", f"{missing}/"]
    result = runner.invoke(app, ["derain", *args, *WEIGHTS])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == f"error: {missing}: no such object or bucket (The specified bucket does not exist)\n"


def test_reading_and_writing_one_object_name_the_store_s_refusal(bucket: str) -> None:
    missing = f"s3://mprnet-missing-{uuid.uuid4().hex[:8]}/a.png"
    with pytest.raises(OutputError) as caught:
        write_target(Picture(np.zeros((2, 2, 3), np.uint8)), missing, "PNG", 95)
    assert caught.value.message == f"{missing}: no such object or bucket (The specified bucket does not exist)"
    with pytest.raises(InputError) as caught:
        read_source(f"{bucket}/nothing.png", None)
    assert caught.value.message == f"{bucket}/nothing.png: no such object or bucket"


def test_a_store_that_cannot_be_reached_is_one_line(bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # the discard port: connection refused
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)  # s3fs's own, with back-off: seconds here
    s3fs.S3FileSystem.clear_instance_cache()
    result = runner.invoke(app, ["derain", f"{bucket}/in", *WEIGHTS])
    s3fs.S3FileSystem.clear_instance_cache()
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {bucket}/in: cannot list (EndpointConnectionError: Could not connect ")
    assert result.stderr.count("\n") == 1


def test_a_clip_on_a_bucket_goes_through_a_local_copy(bucket: str, tmp_path: Path) -> None:
    pytest.importorskip("av", reason="video needs PyAV: pip install 'mprnet[video]'")
    from .test_video import make_clip

    clip = make_clip(tmp_path / "in" / "clip.mkv", frames=2, codec="ffv1")
    _put(f"{bucket}/in/clip.mkv", clip.read_bytes())
    expected = runner.invoke(app, ["denoise", str(clip), "-o", str(tmp_path / "clean.mkv"), *WEIGHTS])
    assert expected.exit_code == 0, expected.stderr
    result = runner.invoke(app, ["denoise", f"{bucket}/in", "-o", f"{bucket}/out", *WEIGHTS])
    assert result.exit_code == 0, result.stderr
    assert result.stderr.startswith(f"{bucket}/in/clip.mkv -> {bucket}/out/clip.mkv (2 frames, ")
    from mprnet_cli.video import read_frames

    storage.download(f"{bucket}/out/clip.mkv", tmp_path / "from_bucket.mkv")
    frames = list(read_frames(tmp_path / "from_bucket.mkv"))
    expected_frames = list(read_frames(tmp_path / "clean.mkv"))
    assert len(frames) == 2
    assert all(pts == want_pts and np.array_equal(pixels, want) for (pts, pixels), (want_pts, want) in zip(frames, expected_frames))
    # --resume keeps segments beside a local output only: a store's clip says so and runs in one pass.
    again = runner.invoke(app, ["denoise", f"{bucket}/in", "-o", f"{bucket}/again", "--resume", *WEIGHTS])
    assert again.exit_code == 0, again.stderr
    assert again.stderr.startswith(f"warning: {bucket}/in/clip.mkv: on an object store, so restored in one pass "
                                   "(--resume needs local files)\n")
    assert storage.exists(f"{bucket}/again/clip.mkv")
