"""Video clips, end to end: frames, timestamps, sound, colour, tags, errors, interrupts.

Every clip is made here with PyAV: a few frames of 48x32 or so, restored by the tiny
model in fp32. Each restored frame is compared with the image path's restore of the
same decoded frame (`Restorer.restore_array`), after the same trip through the
output's pixel format: exact with FFV1, within the codec's error with H.264.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from fractions import Fraction
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mprnet_cli.cli import app
from mprnet_cli.errors import InputError, OutputError
from mprnet_cli.model.restorer import Restorer
from mprnet_cli.pipeline import Job, OutputNaming, plan_jobs
from mprnet_cli.video import Encoding, Span, check_encoding, read_frames, restore_video

from .conftest import TINY_CHECKPOINT, interruptible, write_image
from .trained_model import CHECKPOINT as TRAINED

av = pytest.importorskip("av", reason="video tests need PyAV: pip install 'mprnet[video]'")

runner = CliRunner()
CPU = ["--device", "cpu", "--precision", "fp32"]
#: Lossy comparisons use the trained tiny denoiser: the random tiny model paints detail no
#: codec keeps at visually lossless settings (about 30 dB at CRF 18 on these clips).
LOSSY = ["--weights", str(TRAINED), *CPU]
WEIGHTS = ["--weights", str(TINY_CHECKPOINT), *CPU]
#: RGB PSNR of a restored 48x32 frame at the default CRF against the image path's restore:
#: 38.7 to 39.6 dB measured (the same frame's neighbours: under 28 dB).
LOSSY_PSNR = 37.0
MPRNET = Path(sys.executable).parent / "mprnet"
AUDIO_RATE = 48_000
NOISE = 0.01
#: FFmpeg's colour numbers: BT.709, BT.470BG (BT.601 PAL), SMPTE 170M (BT.601 NTSC).
BT709, BT470BG, SMPTE170M = 1, 5, 6
LIMITED, FULL = 1, 2


def make_clip(path: Path, frames: int = 5, *, width: int = 48, height: int = 32, codec: str = "libx264",
              pixel_format: str = "yuv420p", time_base: Fraction = Fraction(1, 30), pts: list[int] | None = None,
              audio: bool = False, colour: tuple[int, int, int, int] | None = (BT709, LIMITED, BT709, BT709),
              rotation: int | None = None, static: bool = False, options: dict[str, str] | None = None) -> Path:
    """A short clip of moving waves with a little seeded noise (or one still frame
    repeated), with its timestamps
    (default: one per tick of `time_base`), colour tags, optional AAC sound and rotation."""
    rng = np.random.default_rng(frames * 1000 + width)
    path.parent.mkdir(parents=True, exist_ok=True)
    container = av.open(str(path), "w")
    container.metadata["title"] = "rainy test clip"
    stream = container.add_stream(codec, rate=Fraction(1) / time_base, options=options or {})
    stream.width, stream.height, stream.pix_fmt = width, height, pixel_format
    stream.time_base = time_base
    stream.codec_context.time_base = time_base
    stream.metadata["language"] = "fra"
    matrix = "itu709"
    if colour is not None:
        context = stream.codec_context
        context.colorspace, context.color_range, context.color_primaries, context.color_trc = colour
        matrix = "itu709" if colour[0] == BT709 else "itu601"
    if rotation is not None:
        stream.set_display_rotation(rotation)
    deep = "10" in pixel_format
    peak = 65535 if deep else 255
    rows, columns = np.mgrid[:height, :width]

    def picture(index: int) -> np.ndarray:
        waves = [np.sin((columns + 2 * index) / (10 + c) + rows / (12 + 2 * c)) for c in range(3)]
        noisy = (0.5 + 0.35 * np.stack(waves, axis=-1) + rng.normal(0, NOISE, (height, width, 3))).clip(0, 1)
        return (noisy * peak).round().astype(np.uint16 if deep else np.uint8)

    still = picture(0)
    for index, stamp in enumerate(pts if pts is not None else range(frames)):
        pixels = still if static else picture(index)
        frame = av.VideoFrame.from_ndarray(pixels, format="rgb48le" if deep else "rgb24")
        frame = frame.reformat(format=pixel_format, src_colorspace=matrix, dst_colorspace=matrix,
                               src_color_range="JPEG", dst_color_range="MPEG")
        frame.pts = stamp
        container.mux(stream.encode(frame))
    container.mux(stream.encode())
    container.close()
    if audio:
        _add_sound(path, seconds=float((pts[-1] + 1 if pts else frames) * time_base))
    return path


def _add_sound(path: Path, seconds: float) -> None:
    """Remux the clip with an AAC track of `seconds` (streams must all exist before the first packet)."""
    silent = path.with_name(".silent" + path.suffix)
    path.rename(silent)
    with av.open(str(silent)) as source, av.open(str(path), "w") as target:
        target.metadata.update(source.metadata)
        video = target.add_stream_from_template(source.streams.video[0])
        video.metadata.update(source.streams.video[0].metadata)
        sound = target.add_stream("aac", rate=AUDIO_RATE, layout="stereo")
        for packet in source.demux(source.streams.video[0]):
            if packet.size:
                packet.stream = video
                target.mux(packet)
        samples = 0
        while samples < seconds * AUDIO_RATE:
            wave = np.sin(2 * np.pi * 440 * (samples + np.arange(1024)) / AUDIO_RATE).astype(np.float32)
            frame = av.AudioFrame.from_ndarray(np.stack([wave, wave]), format="fltp", layout="stereo")
            frame.sample_rate, frame.pts = AUDIO_RATE, samples
            target.mux(sound.encode(frame))
            samples += 1024
        target.mux(sound.encode())
    silent.unlink()


def clip_facts(path: Path) -> dict[str, object]:
    """What must survive: timestamps, time base, colour tags, rotation, tags, sound length."""
    with av.open(str(path)) as container:
        video = container.streams.video[0]
        context = video.codec_context
        frames = list(container.decode(video=0))
        audio_seconds = None
        if container.streams.audio:
            container.seek(0)
            audio_seconds = sum(frame.samples / frame.sample_rate for frame in container.decode(audio=0))
        return {
            "pts": [float(f.pts * video.time_base) for f in frames],
            "colour": (context.colorspace, context.color_range, context.color_primaries, context.color_trc),
            "rotation": frames[0].rotation,
            "title": container.metadata.get("title"),
            "language": video.metadata.get("language"),
            "audio_seconds": float(audio_seconds) if audio_seconds is not None else None,
            "pixel_format": frames[0].format.name,
            "codec": context.name,
        }


@pytest.fixture(scope="module")
def restorer() -> Restorer:
    return Restorer.from_checkpoint(TINY_CHECKPOINT, precision="fp32", device="cpu")


@pytest.fixture(scope="module")
def denoiser() -> Restorer:
    return Restorer.from_checkpoint(TRAINED, precision="fp32", device="cpu")


def expected_frames(restorer: Restorer, source: Path, pixel_format: str, colour: str = "itu709",
                    span: Span = Span()) -> list[np.ndarray]:
    """The image path's restore of each decoded frame, through the output's pixel format and back."""
    expected = []
    for _, pixels in read_frames(source, span):
        restored = restorer.restore_array(pixels)
        frame = av.VideoFrame.from_ndarray(restored, format="rgb48le" if restored.dtype == np.uint16 else "rgb24")
        frame = frame.reformat(format=pixel_format, src_colorspace=colour, dst_colorspace=colour,
                               src_color_range="JPEG", dst_color_range="MPEG", interpolation="BICUBIC")
        expected.append(frame.reformat(format=frame.format.name).to_ndarray(
            format="rgb48le" if restored.dtype == np.uint16 else "rgb24", src_colorspace=colour,
            dst_colorspace=colour, src_color_range="MPEG", dst_color_range="JPEG", interpolation="BICUBIC"))
    return expected


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    peak = 65535.0 if a.dtype == np.uint16 else 255.0
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(peak**2 / mse)


def restore(args: list[str], task: str = "deblur", options: list[str] = WEIGHTS, **kwargs: object):  # noqa: ANN201
    return runner.invoke(app, [task, *args, *options], **kwargs)


def test_a_clip_keeps_its_frames_timestamps_sound_colours_rotation_and_tags(tmp_path: Path, denoiser: Restorer) -> None:
    source = make_clip(tmp_path / "clip.mp4", frames=4, audio=True, rotation=90)
    result = restore([str(source)], "denoise", LOSSY)
    target = tmp_path / "clip_denoised.mp4"
    assert result.exit_code == 0, result.stderr
    assert result.stderr.startswith(f"{source} -> {target} (4 frames, 0.1 s of video, ")
    before, after = clip_facts(source), clip_facts(target)
    assert after["pts"] == before["pts"] == pytest.approx([i / 30 for i in range(4)])
    assert after["colour"] == before["colour"] == (BT709, LIMITED, BT709, BT709)
    assert after["rotation"] == before["rotation"] == 90
    assert after["title"] == "rainy test clip" and after["language"] == "fra"
    assert after["codec"] == "h264" and after["pixel_format"] == "yuv420p"
    assert abs(after["audio_seconds"] - before["audio_seconds"]) <= 1024 / AUDIO_RATE
    decoded = [pixels for _, pixels in read_frames(target)]
    wanted = expected_frames(denoiser, source, "yuv420p")
    assert len(decoded) == len(wanted) == 4
    assert min(psnr(a, b) for a, b in zip(decoded, wanted)) >= LOSSY_PSNR


def test_variable_frame_rate_in_ffv1_comes_back_exactly(tmp_path: Path, restorer: Restorer) -> None:
    stamps = [0, 40, 90, 300]
    source = make_clip(tmp_path / "vfr.mkv", codec="ffv1", time_base=Fraction(1, 1000), pts=stamps,
                       colour=(SMPTE170M, LIMITED, SMPTE170M, SMPTE170M))
    target = tmp_path / "out.mkv"
    result = restore([str(source), "-o", str(target)])
    assert result.exit_code == 0, result.stderr
    after = clip_facts(target)
    assert after["pts"] == [stamp / 1000 for stamp in stamps]
    assert after["codec"] == "ffv1"
    assert after["colour"] == (SMPTE170M, LIMITED, SMPTE170M, SMPTE170M)  # BT.601 in, BT.601 out
    decoded = [pixels for _, pixels in read_frames(target)]
    wanted = expected_frames(restorer, source, "yuv420p", colour="itu601")
    assert len(decoded) == 4
    for got, want in zip(decoded, wanted):
        np.testing.assert_array_equal(got, want)


def test_untagged_colour_is_taken_as_players_take_it() -> None:
    from mprnet_cli.video import Colour

    for height, matrix in ((720, BT709), (32, SMPTE170M)):
        frame = av.VideoFrame(64, height, "yuv420p")
        assert Colour.of(frame, "clip.mp4") == Colour(matrix, LIMITED, 2, 2)
    assert Colour.of(av.VideoFrame(64, 32, "yuvj420p"), "clip.mp4").range == FULL


def test_an_unsupported_matrix_is_converted_as_players_would_and_the_warning_names_the_clip(
        caplog: pytest.LogCaptureFixture) -> None:
    from mprnet_cli.video import Colour

    frame = av.VideoFrame(64, 32, "yuv420p")
    frame.colorspace = 8  # YCgCo: swscale has no coefficients for it
    assert Colour.of(frame, "clip.mp4").matrix == SMPTE170M
    assert caplog.messages == ["clip.mp4: colour matrix 8 is not supported; converting as BT.601"]


def test_bt709_red_is_converted_with_bt709_maths(tmp_path: Path) -> None:
    source = tmp_path / "red.mkv"
    container = av.open(str(source), "w")
    stream = container.add_stream("ffv1", rate=30)
    stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv444p"
    stream.codec_context.colorspace, stream.codec_context.color_range = BT709, LIMITED
    red = np.zeros((32, 48, 3), np.uint8)
    red[..., 0] = 255
    frame = av.VideoFrame.from_ndarray(red, format="rgb24").reformat(
        format="yuv444p", src_colorspace="itu709", dst_colorspace="itu709", src_color_range="JPEG", dst_color_range="MPEG")
    frame.pts = 0
    container.mux(stream.encode(frame))
    container.mux(stream.encode())
    container.close()
    (_, pixels), = read_frames(source)
    assert np.abs(pixels[0, 0].astype(int) - [255, 0, 0]).max() <= 2  # BT.601 maths gives (232, 0, 1)


def test_ten_bit_is_restored_in_sixteen_bits_and_written_as_ten(tmp_path: Path, denoiser: Restorer) -> None:
    # 64 wide: x265 refuses narrower frames (mprnet_cli.video.X265_MIN_WIDTH).
    source = make_clip(tmp_path / "deep.mkv", frames=2, width=64, height=48, codec="libx265", pixel_format="yuv420p10le",
                       options={"x265-params": "log-level=error"})
    target = tmp_path / "deep_out.mkv"
    result = restore([str(source), "-o", str(target)], "denoise", LOSSY)
    assert result.exit_code == 0, result.stderr
    after = clip_facts(target)
    assert (after["codec"], after["pixel_format"]) == ("hevc", "yuv420p10le")
    decoded = [pixels for _, pixels in read_frames(target)]
    assert decoded[0].dtype == np.uint16
    wanted = expected_frames(denoiser, source, "yuv420p10le")
    assert min(psnr(a, b) for a, b in zip(decoded, wanted)) >= LOSSY_PSNR


def test_odd_sizes_part_of_a_clip_and_a_fixed_tile_grid(tmp_path: Path, restorer: Restorer) -> None:
    source = make_clip(tmp_path / "odd.mkv", frames=4, width=47, height=33, codec="ffv1", static=True)
    target = tmp_path / "odd_out.mkv"
    result = restore([str(source), "-o", str(target), "--frames", "1:3", "--tile", "32", "--tile-overlap", "8"])
    assert result.exit_code == 0, result.stderr
    after = clip_facts(target)
    part = clip_facts(source)["pts"][1:3]
    assert after["pts"] == pytest.approx([stamp - part[0] for stamp in part])  # the part starts at 0
    assert after["pixel_format"] == "yuv444p"  # 4:2:0 cannot cover an odd size
    decoded = [pixels for _, pixels in read_frames(target)]
    # A still clip stays still: one tile grid for every frame, so no seam moves (no flicker).
    assert all(np.array_equal(frame, decoded[0]) for frame in decoded)
    tiled = Restorer.from_checkpoint(TINY_CHECKPOINT, precision="fp32", device="cpu", tile=32, tile_overlap=8)
    np.testing.assert_array_equal(decoded[0], expected_frames(tiled, source, "yuv444p", span=Span(1, 2))[0])


def test_start_and_end_in_seconds_cut_video_and_sound(tmp_path: Path) -> None:
    source = make_clip(tmp_path / "clip.mp4", frames=5, audio=True)  # H.264: one keyframe, then seeking back
    target = tmp_path / "part.mp4"
    result = restore([str(source), "-o", str(target), "--start", "0.05", "--end", "0.12"])
    assert result.exit_code == 0, result.stderr
    after = clip_facts(target)
    assert after["pts"] == pytest.approx([0, 1 / 30])  # the frames at 2/30 and 3/30 s
    assert after["audio_seconds"] <= 2 / 30 + 2 * 1024 / AUDIO_RATE


def test_pipes_with_mkv(tmp_path: Path) -> None:
    source = make_clip(tmp_path / "clip.mkv", frames=3, audio=True)
    result = restore(["-", "--ext", "mkv", "-o", "-"], input=source.read_bytes())
    assert result.exit_code == 0, result.stderr
    piped = tmp_path / "piped.mkv"
    piped.write_bytes(result.stdout_bytes)
    after = clip_facts(piped)
    assert after["pts"] == clip_facts(source)["pts"] and after["audio_seconds"] is not None


def test_python_api_and_a_container_that_needs_other_codecs(tmp_path: Path, restorer: Restorer,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    source = make_clip(tmp_path / "clip.mp4", frames=3, audio=True)
    seen = []
    summary = restore_video(restorer, source, tmp_path / "out.webm", encoding=Encoding(crf=10),
                            progress=lambda done, total: seen.append((done, total)))
    assert (summary.frames, summary.width, summary.height, summary.damaged) == (3, 48, 32, 0)
    assert seen == [(0, 3), (1, 3), (2, 3), (3, 3)]
    after = clip_facts(tmp_path / "out.webm")
    assert after["codec"] == "vp9"  # WebM holds no H.264 (nor AAC: the sound is re-encoded as Opus)
    assert abs(after["audio_seconds"] - clip_facts(source)["audio_seconds"]) <= 1024 / AUDIO_RATE
    assert "the sound (aac) cannot go into this container; re-encoded as opus" in caplog.text


def test_planning_keeps_clips_in_containers(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    make_clip(folder / "clip.mp4", frames=1)
    write_image(folder / "photo.jpg")
    plan = plan_jobs([str(folder)], OutputNaming("deblur", output=str(tmp_path / "out"), extension=".png"))
    assert plan.jobs == [Job(str(folder / "clip.mp4"), str(tmp_path / "out" / "clip.mp4"), ".mp4"),
                         Job(str(folder / "photo.jpg"), str(tmp_path / "out" / "photo.png"))]
    plan = plan_jobs([str(folder)], OutputNaming("deblur", extension=".mkv"))
    assert [job.target for job in plan.jobs] == [str(folder / "clip_deblurred.mkv"), str(folder / "photo_deblurred.jpg")]
    with pytest.raises(OutputError, match="a video is written as a video"):
        plan_jobs([str(folder / "clip.mp4")], OutputNaming("deblur", output=str(tmp_path / "x.png")))
    with pytest.raises(OutputError, match="an image cannot be written as a video"):
        plan_jobs([str(folder / "photo.jpg")], OutputNaming("deblur", output=str(tmp_path / "x.mp4")))
    with pytest.raises(OutputError, match="needs --ext mkv or --ext ts"):
        plan_jobs([str(folder / "clip.mp4")], OutputNaming("deblur", output="-"))


def test_a_folder_of_clips_and_photos(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    make_clip(folder / "clip.mkv", frames=2, codec="ffv1")
    write_image(folder / "photo.png")
    (folder / "notes.txt").write_text("not a picture")
    out = tmp_path / "out"
    result = restore([str(folder), "-o", str(out), "--ext", "jpg"])
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["clip.mkv", "photo.jpg"]
    lines = result.stderr.splitlines()
    assert lines[0] == f"skipped {folder / 'notes.txt'}: not an image"
    assert lines[1].startswith(f"{folder / 'clip.mkv'} -> {out / 'clip.mkv'} (2 frames, 0.1 s of video, ")
    assert lines[2].startswith(f"{folder / 'photo.png'} -> {out / 'photo.jpg'} (0.00 MP, ")
    assert lines[3].startswith("2 done, 1 skipped, 0 failed; ")


@pytest.mark.parametrize(("encoding", "message"), [
    (Encoding(codec="mpeg2"), "--codec mpeg2: expected one of h264, hevc, av1, vp9, ffv1"),
    (Encoding(codec="ffv1", crf=10), "--crf: ffv1 is lossless and takes no quality setting"),
    (Encoding(codec="h264", preset="turbo"), "--preset turbo: h264 takes ultrafast, "),
    (Encoding(codec="av1", preset="20"), "--preset 20: av1 takes a number from 0 (slowest) to 13 (fastest)"),
    (Encoding(codec="h264", crf=99), "--crf 99: expected 0 to 63"),
])
def test_encoding_refusals(encoding: Encoding, message: str) -> None:
    with pytest.raises(OutputError) as caught:
        check_encoding(encoding)
    assert caught.value.message.startswith(message)


def _one_error(args: list[str]) -> tuple[int, str]:
    result = restore(args)
    return result.exit_code, result.stderr


def test_bad_clips_are_one_line_each(tmp_path: Path) -> None:
    audio_only = tmp_path / "song.mkv"
    with av.open(str(audio_only), "w") as container:
        sound = container.add_stream("aac", rate=AUDIO_RATE)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = AUDIO_RATE, 0
        container.mux(sound.encode(frame))
        container.mux(sound.encode())
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video at all" * 10)
    clip = make_clip(tmp_path / "clip.mp4", frames=2)
    cases = [
        ([str(audio_only)], f"error: {audio_only}: an audio-only file; nothing to restore\n"),
        ([str(garbage)], f"error: {garbage}: cannot read as a video (Invalid data found when processing input)\n"),
        ([str(clip), "--frames", "5:"], f"error: {clip}: no frames in the chosen part of the clip\n"),
    ]
    for args, stderr in cases:
        assert _one_error(args) == (2, stderr)
    assert not list(tmp_path.glob("*_deblurred*")) and not list(tmp_path.glob(".mprnet-*"))


def test_a_truncated_clip_restores_what_decodes(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "clip.mkv", frames=6, codec="ffv1")
    data = clip.read_bytes()
    clip.write_bytes(data[: len(data) * 2 // 3])
    code, stderr = _one_error([str(clip)])
    assert code == 1
    restored = len(list(read_frames(tmp_path / "clip_deblurred.mkv")))
    assert 1 <= restored < 6
    assert stderr == (f"error: {clip}: {6 - restored} frame(s) damaged or missing; what decoded ({restored} frames) "
                      f"is restored in {tmp_path / 'clip_deblurred.mkv'}\n")


def test_a_truncated_mpeg_ts_is_reported_damaged(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "clip.ts", frames=20)  # MPEG-TS states no frame count nor duration
    data = clip.read_bytes()
    cut = len(data) * 2 // 3
    clip.write_bytes(data[: cut if cut % 188 else cut - 94])  # inside a 188-byte packet, as a cut file ends
    code, stderr = _one_error([str(clip)])
    assert code == 1
    restored = len(list(read_frames(tmp_path / "clip_deblurred.ts")))
    assert 5 <= restored < 20
    assert stderr.splitlines()[-1] == (f"error: {clip}: 1 frame(s) damaged or missing; what decoded ({restored} frames) "
                                       f"is restored in {tmp_path / 'clip_deblurred.ts'}")  # after progress on a slow machine
    make_clip(clip, frames=20)  # whole again: not damaged
    assert _one_error([str(clip), "--overwrite"])[0] == 0


def test_without_pyav_a_clip_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clip = make_clip(tmp_path / "clip.mp4", frames=1)
    monkeypatch.setitem(sys.modules, "av", None)  # import av now raises ImportError
    assert _one_error([str(clip)]) == (2, f"error: {clip}: video needs PyAV: pip install 'mprnet[video]'\n")


def test_interrupt_leaves_no_partial_file(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "long.mkv", frames=300, width=64, height=48, codec="ffv1")
    target = tmp_path / "out" / "long.mkv"
    command = [str(MPRNET), "deblur", str(clip), "-o", str(target), *WEIGHTS]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "NO_COLOR": "1"}, preexec_fn=interruptible)
    deadline = time.monotonic() + 60
    while not list(target.parent.glob(".mprnet-*")) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # a few frames in
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr.decode()
    assert stdout == b""
    assert not target.exists() and not list(target.parent.glob("*"))


@pytest.mark.parametrize(("options", "message"), [
    (["--frames", "ten"], "for '--frames': 'ten': expected START:END frame numbers, such as 0:100, 50: or :25"),
    (["--frames", "9:3"], "for '--frames': '9:3': END must be greater than START"),
    (["--frames", "0:5", "--start", "1"], "for '--frames': give --frames or --start/--end, not both"),
    (["--start", "2", "--end", "1"], "for '--end': 1.0: must come after --start (2.0)"),
])
def test_bad_parts_name_their_option(tmp_path: Path, options: list[str], message: str, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    from mprnet_cli.cli import main

    monkeypatch.setattr(sys, "argv", ["mprnet", "deblur", str(tmp_path / "clip.mp4"), *WEIGHTS, *options])
    with pytest.raises(SystemExit) as exit_status:
        main()
    assert exit_status.value.code == 2
    assert capsys.readouterr() == ("", f"error: Invalid value {message} (see `mprnet deblur --help`)\n")


def _subtitled(path: Path, codec: str, cues: list[str]) -> Path:
    """A clip with a subtitle track of `codec` (subrip, ass, mov_text) holding one cue every 50 ms."""
    plain = make_clip(path.with_name("plain" + path.suffix), frames=4, codec="ffv1" if path.suffix == ".mkv" else "libx264")
    with av.open(str(plain)) as source, av.open(str(path), "w") as target:
        video = target.add_stream_from_template(source.streams.video[0])
        subtitles = target.add_mux_stream(codec, time_base=Fraction(1, 1000))
        subtitles.metadata["language"] = "eng"
        for packet in source.demux(video=0):
            if packet.size:
                packet.stream = video
                target.mux(packet)
        for index, cue in enumerate(cues):
            # mov_text stores each cue after its length in two bytes; SubRip and ASS as text.
            cue_packet = av.Packet(len(cue).to_bytes(2, "big") + cue.encode() if codec == "mov_text" else cue.encode())
            cue_packet.stream, cue_packet.time_base = subtitles, Fraction(1, 1000)
            cue_packet.pts = cue_packet.dts = index * 50
            cue_packet.duration = 40
            target.mux(cue_packet)
    return path


def _cues(path: Path) -> tuple[str, str | None, list[tuple[float, str]]] | None:
    """The subtitle track's codec, language and (seconds, text) of each cue; None without one."""
    with av.open(str(path)) as container:
        if not container.streams.subtitles:
            return None
        stream = container.streams.subtitles[0]
        name = stream.codec_context.name
        cues = []
        for packet in container.demux(stream):
            text = bytes(packet)[2:] if name == "mov_text" else bytes(packet)  # mp4 also stores empty gap cues
            if text:
                cues.append((float(packet.pts * packet.time_base), text.decode()))
        return name, stream.metadata.get("language"), cues


@pytest.mark.parametrize(("source_name", "codec", "target_name", "kept"), [
    ("srt.mkv", "subrip", "out.mkv", "srt"),
    ("ass.mkv", "ass", "out.mkv", "ssa"),
    ("timed.mp4", "mov_text", "out.mp4", "mov_text"),
    ("srt.mkv", "subrip", "out.mp4", None),
])
def test_subtitles_are_copied_where_the_container_holds_them(tmp_path: Path, source_name: str, codec: str,
                                                             target_name: str, kept: str | None) -> None:
    cues = ["0,0,Default,,0,0,0,,hello", "0,0,Default,,0,0,0,,world"] if codec == "ass" else ["hello", "world"]
    source = _subtitled(tmp_path / source_name, codec, cues)
    target = tmp_path / target_name
    result = restore([str(source), "-o", str(target)])
    assert result.exit_code == 0, result.stderr
    if kept is None:
        assert _cues(target) is None
        assert result.stderr.splitlines()[0] == f"warning: {target}: a subtitle stream (srt) cannot be written to mp4 and is left out"
    else:
        assert _cues(target) == (kept, "eng", [(0.0, cues[0]), (0.05, cues[1])])
        assert len(result.stderr.splitlines()) == 1  # the clip's line, no warning


@pytest.mark.parametrize("resume", [False, True])
def test_several_frames_per_forward_give_the_frames_of_one_at_a_time(tmp_path: Path, restorer: Restorer,
                                                                     resume: bool) -> None:
    """As on a GPU with room for three frames: 10 frames go through in forwards of 3, 3, 3 and 1
    (with --resume, the first 10 s segment kept from an earlier run is not restored again)."""
    stamps = [0, 2, 4, 6, 8, 11, 12, 13, 14, 15]  # seconds: 5 frames in the first segment, 5 after
    source = make_clip(tmp_path / "clip.mkv", codec="ffv1", time_base=Fraction(1), pts=stamps, audio=True)
    target = tmp_path / "out.mkv"
    batched = Restorer(restorer.model, device="cpu", tile_batch=3)
    if resume:
        with pytest.raises(KeyboardInterrupt):
            restore_video(batched, source, target, resume=True, progress=_interrupt_at(7))
    sizes: list[int] = []
    restore_frames = batched.restore_frames
    batched.restore_frames = lambda frames: sizes.append(len(frames)) or restore_frames(frames)  # type: ignore[method-assign]
    summary = restore_video(batched, source, target, resume=resume)
    assert sizes == ([3, 2] if resume else [3, 3, 3, 1])
    assert summary.frames == 10 and clip_facts(target)["pts"] == stamps
    assert clip_facts(target)["audio_seconds"] == pytest.approx(clip_facts(source)["audio_seconds"], abs=1024 / AUDIO_RATE)
    for got, want in zip(_decoded(target), expected_frames(restorer, source, "yuv420p"), strict=True):
        np.testing.assert_array_equal(got, want)


def _interrupt_at(frame: int) -> Callable[[int, int | None], None]:
    def progress(done: int, total: int | None) -> None:
        if done == frame:
            raise KeyboardInterrupt
    return progress


def _stop_when(command: list[str], sign: Path, how: signal.Signals) -> int:
    """Run `command`, send `how` as soon as `sign` exists; its exit status."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env={**os.environ, "NO_COLOR": "1"}, preexec_fn=interruptible)
    deadline = time.monotonic() + 120
    while not sign.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(how)
    _, stderr = process.communicate(timeout=60)
    assert sign.exists(), stderr.decode()
    return process.returncode


def _decoded(path: Path) -> list[np.ndarray]:
    return [pixels for _, pixels in read_frames(path)]


def _video_packets(path: Path) -> list[bytes]:
    with av.open(str(path)) as container:
        return [bytes(packet) for packet in container.demux(video=0) if packet.size]


def test_resume_after_an_interrupt_and_a_kill_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    # One frame a second: each 10 s segment holds 10 frames, so 40 frames make 4 segments.
    source = make_clip(tmp_path / "clip.mp4", frames=40, time_base=Fraction(1), audio=True)
    whole = tmp_path / "whole.mp4"
    command = [str(MPRNET), "deblur", str(source), "-o", str(whole), "--resume", *WEIGHTS]
    assert subprocess.run(command, capture_output=True, timeout=300).returncode == 0
    target = tmp_path / "out" / "clip.mp4"
    parts = target.with_name(".clip.mp4.mprnet-parts")
    command = [str(MPRNET), "deblur", str(source), "-o", str(target), "--resume", *WEIGHTS]

    # Ctrl-C once the first segment is kept: exit 130, no output, nothing half-written.
    assert _stop_when(command, parts / "000000.mp4", signal.SIGINT) == 130
    assert sorted(p.name for p in target.parent.iterdir()) == [parts.name]
    kept = sorted(p.name for p in parts.iterdir())
    assert kept[0] == "000000.mp4" and "manifest.json" in kept and len(kept) < 5
    assert not list(parts.glob(".mprnet-*"))
    # Killed outright, with no chance to clean up, once the second segment is kept.
    assert _stop_when(command, parts / "000001.mp4", signal.SIGKILL) == -signal.SIGKILL
    finished = sorted(parts.glob("0*.mp4"))
    assert [p.name for p in finished[:2]] == ["000000.mp4", "000001.mp4"] and len(finished) < 4
    earlier = [packet for segment in finished for packet in _video_packets(segment)]

    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "NO_COLOR": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith(f"{source}: resuming: {len(finished)} finished segment(s) kept from an earlier run\n")
    assert sorted(p.name for p in target.parent.iterdir()) == ["clip.mp4"]  # the work folder is gone
    before, after = clip_facts(source), clip_facts(target)
    assert after["pts"] == before["pts"] == list(range(40))
    assert abs(after["audio_seconds"] - before["audio_seconds"]) <= 1024 / AUDIO_RATE
    # The segments the interrupted runs kept are joined as they were, not encoded again.
    assert _video_packets(target)[:len(earlier)] == earlier
    # Against the uninterrupted run: x264 in this FFmpeg build does not encode the same
    # frames to the same bytes twice (its macroblock tree reads memory it never wrote;
    # docs/video.md), so two uninterrupted runs differ too, by about 40 dB here. Exactness
    # with a deterministic encoder is the FFV1 test's.
    decoded, uninterrupted = _decoded(target), _decoded(whole)
    assert len(decoded) == len(uninterrupted) == 40
    assert min(psnr(a, b) for a, b in zip(decoded, uninterrupted)) >= LOSSY_PSNR


def test_resume_in_ffv1_is_exact_and_another_command_starts_over(tmp_path: Path, restorer: Restorer,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mprnet")
    stamps = [index * 900 + index % 3 * 170 for index in range(14)]  # variable frame rate over 12 s
    source = make_clip(tmp_path / "vfr.mkv", codec="ffv1", time_base=Fraction(1, 1000), pts=stamps, audio=True)
    target = tmp_path / "out.mkv"
    parts = tmp_path / ".out.mkv.mprnet-parts"

    with pytest.raises(KeyboardInterrupt):  # 11 frames in the first 10 s: the 13th is in the second segment
        restore_video(restorer, source, target, resume=True, progress=_interrupt_at(13))
    assert sorted(p.name for p in parts.iterdir()) == ["000000.mkv", "manifest.json"] and not target.exists()
    other = Restorer.from_checkpoint(TINY_CHECKPOINT, precision="fp32", device="cpu", tile_overlap=16)
    with pytest.raises(KeyboardInterrupt):
        restore_video(other, source, target, resume=True, progress=_interrupt_at(13))
    assert f"{source}: the segments in {parts} were made by another command" in caplog.text
    caplog.clear()

    summary = restore_video(other, source, target, resume=True)
    assert caplog.messages == [f"{source}: resuming: 1 finished segment(s) kept from an earlier run"]
    assert (summary.frames, summary.damaged) == (14, 0) and 11.87 < summary.duration < 12  # the last frame starts at 11.87 s
    assert not parts.exists()
    assert clip_facts(target)["pts"] == [stamp / 1000 for stamp in stamps]
    assert abs(clip_facts(target)["audio_seconds"] - clip_facts(source)["audio_seconds"]) <= 1024 / AUDIO_RATE
    wanted = expected_frames(restorer, source, "yuv420p")
    decoded = _decoded(target)
    assert len(decoded) == 14 and all(np.array_equal(a, b) for a, b in zip(decoded, wanted))


def test_resume_needs_files(tmp_path: Path) -> None:
    source = make_clip(tmp_path / "clip.mkv", frames=2, codec="ffv1")
    result = restore(["-", "--ext", "mkv", "-o", "-", "--resume"], input=source.read_bytes())
    assert (result.exit_code, result.stderr) == (2, "error: stdin: --resume needs a clip file in and a file out, not a pipe\n")
