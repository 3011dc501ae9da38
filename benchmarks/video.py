"""Frames per second of a clip through `mprnet_cli.video`, and the share of the time the
network is busy: whether decoding, colour conversion, encoding and muxing hide behind it.

A synthetic clip (moving waves plus noise, H.264 in MP4 with AAC sound, BT.709) is made
first, then restored with the task's published width and seeded random weights (speed
does not depend on their values). Busy share = time inside the restorer
(`VideoSummary.compute_seconds`) over the wall time from the first frame decoded to the
file closed.

On this 2-core CPU a 1080p derain frame takes about half a minute, so the default is 8
frames: enough for the pipeline to reach its steady state (two queues of 4), short
enough to run. Run it under the shared CPU lock:

    flock /tmp/mprnet-cpu.lock python benchmarks/video.py                 # 8 frames of 1080p, derain
    python benchmarks/video.py --device cuda --frames 48                   # where a GPU is lent

`--codecs` instead measures each codec family's default quality: a 4-frame 64x48 FFV1 clip
restored by the tests' trained tiny denoiser, each frame of the encoded result against
the image path's restore of the same decoded frame (RGB PSNR, through 4:2:0 and back).

    flock /tmp/mprnet-cpu.lock python benchmarks/video.py --codecs

`--flicker`: frame-to-frame flicker on static 128x96 H.264 clips at the default CRF, input
and output: the mean absolute difference between consecutive frames (8-bit levels), for
still frames and for a still scene under fresh noise in every frame.
`--memory`: peak RSS of a process restoring 50 and 500 small frames (64x48, the tests'
tiny model), in one pass and with --resume: flat memory means the same peak.
`--psnr`: the tests' lossy comparison (trained tiny denoiser, H.264, each frame against the
image path's restore) at growing frame sizes at the default CRF 18, and at CRF 15 and 12.

    flock /tmp/mprnet-cpu.lock python benchmarks/video.py --flicker
    flock /tmp/mprnet-cpu.lock python benchmarks/video.py --memory
    flock /tmp/mprnet-cpu.lock python benchmarks/video.py --psnr
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from mprnet_cli.model.config import TASK_CONFIGS, TASKS
from mprnet_cli.model.network import MPRNet
from mprnet_cli.model.restorer import Restorer
from mprnet_cli.video import Encoding, restore_video


def make_clip(path: Path, frames: int, width: int, height: int, rate: int = 30, codec: str = "libx264") -> None:
    import av

    rng = np.random.default_rng(0)
    rows, columns = np.mgrid[:height, :width].astype(np.float32)
    options = {"crf": "18", "preset": "veryfast"} if codec == "libx264" else {}
    scale = max(width / 1920, 0.02)  # the same waves, scaled to the frame
    with av.open(str(path), "w") as container:
        video = container.add_stream(codec, rate=rate, options=options)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        context = video.codec_context
        context.colorspace = context.color_range = context.color_primaries = context.color_trc = 1
        sound = container.add_stream("aac", rate=48_000, layout="stereo")
        for index in range(frames):
            waves = np.stack([np.sin((columns + 8 * scale * index) / ((60 + 9 * c) * scale) + rows / ((45 + 7 * c) * scale))
                              for c in range(3)], -1)
            pixels = (0.5 + 0.35 * waves + rng.normal(0, 0.05, waves.shape)).clip(0, 1)
            frame = av.VideoFrame.from_ndarray((pixels * 255).astype(np.uint8), format="rgb24").reformat(
                format="yuv420p", src_colorspace="itu709", dst_colorspace="itu709", src_color_range="JPEG",
                dst_color_range="MPEG")
            frame.pts = index
            container.mux(video.encode(frame))
        container.mux(video.encode())
        samples = 0
        while samples < frames / rate * 48_000:
            audio = av.AudioFrame.from_ndarray(np.zeros((2, 1024), np.float32), format="fltp", layout="stereo")
            audio.sample_rate, audio.pts = 48_000, samples
            container.mux(sound.encode(audio))
            samples += 1024
        container.mux(sound.encode())


def codec_quality() -> None:
    """Each family's default CRF against the image path's restore of the same frames."""
    import av

    from mprnet_cli.video import CODECS, read_frames
    from tests.trained_model import CHECKPOINT

    restorer = Restorer.from_checkpoint(CHECKPOINT, precision="fp32", device="cpu")
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "clip.mkv"
        make_clip(source, 4, 64, 48, codec="ffv1")
        wanted = []
        for _, pixels in read_frames(source):
            frame = av.VideoFrame.from_ndarray(restorer.restore_array(pixels), format="rgb24").reformat(
                format="yuv420p", src_colorspace="itu709", dst_colorspace="itu709", src_color_range="JPEG",
                dst_color_range="MPEG", interpolation="BICUBIC")
            wanted.append(frame.to_ndarray(format="rgb24", src_colorspace="itu709", dst_colorspace="itu709",
                                           src_color_range="MPEG", dst_color_range="JPEG", interpolation="BICUBIC"))
        for family, codec in CODECS.items():
            target = Path(folder) / f"{family}.mkv"
            restore_video(restorer, source, target, encoding=Encoding(codec=family))
            scores = []
            for (_, got), want in zip(read_frames(target), wanted):
                error = np.mean((got.astype(np.float64) - want) ** 2)
                scores.append(round(10 * np.log10(255**2 / error), 1) if error else float("inf"))
            print(json.dumps({"codec": family, "crf": codec.crf, "psnr_db": scores, "bytes": target.stat().st_size}))


def _temporal_difference(frames: list[np.ndarray]) -> float:
    """Mean absolute difference between consecutive frames, in 8-bit levels."""
    return float(np.mean([np.abs(b.astype(np.float64) - a).mean() for a, b in zip(frames, frames[1:])]))


def flicker() -> None:
    """Static clips, lossy (H.264 at the default CRF) in and out: does restoring add flicker?"""
    import av

    from mprnet_cli.video import read_frames
    from tests.trained_model import CHECKPOINT

    restorer = Restorer.from_checkpoint(CHECKPOINT, precision="fp32", device="cpu")
    width, height, count = 128, 96, 30
    rows, columns = np.mgrid[:height, :width]
    scene = 0.5 + 0.35 * np.stack([np.sin(columns / (10 + c) + rows / (12 + 2 * c)) for c in range(3)], -1)
    for name, fresh_noise in (("still frames", False), ("still scene, fresh noise (sigma 0.03) each frame", True)):
        rng = np.random.default_rng(0)
        with tempfile.TemporaryDirectory() as folder:
            source, target = Path(folder) / "static.mp4", Path(folder) / "restored.mp4"
            with av.open(str(source), "w") as container:
                stream = container.add_stream("libx264", rate=30, options={"crf": "18"})
                stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
                still = (scene + rng.normal(0, 0.03, scene.shape)).clip(0, 1)
                for index in range(count):
                    pixels = (scene + rng.normal(0, 0.03, scene.shape)).clip(0, 1) if fresh_noise else still
                    frame = av.VideoFrame.from_ndarray((pixels * 255).round().astype(np.uint8), format="rgb24")
                    frame = frame.reformat(format="yuv420p", src_colorspace="itu601", dst_colorspace="itu601",
                                           src_color_range="JPEG", dst_color_range="MPEG")
                    frame.pts = index
                    container.mux(stream.encode(frame))
                container.mux(stream.encode())
            restore_video(restorer, source, target)
            before = [pixels for _, pixels in read_frames(source)]
            after = [pixels for _, pixels in read_frames(target)]
            print(json.dumps({"clip": name, "size": f"{width}x{height}", "frames": [len(before), len(after)],
                              "input_flicker": round(_temporal_difference(before), 3),
                              "output_flicker": round(_temporal_difference(after), 3)}))


def memory_run(frames: int, resume: bool) -> None:
    """One measurement, in a process of its own: peak RSS restoring `frames` 64x48 frames."""
    from tests.conftest import TINY_CHECKPOINT

    restorer = Restorer.from_checkpoint(TINY_CHECKPOINT, precision="fp32", device="cpu")
    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder) / "clip.mp4", Path(folder) / "restored.mp4"
        make_clip(source, frames, 64, 48)
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        summary = restore_video(restorer, source, target, resume=resume)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"frames": summary.frames, "resume": resume, "peak_rss_mb": round(peak / 1024, 1),
                      "rss_before_restoring_mb": round(baseline / 1024, 1)}))


def memory() -> None:
    for resume in (False, True):
        for frames in (50, 500):
            command = [sys.executable, __file__, "--memory-run", str(frames)] + (["--resume"] if resume else [])
            subprocess.run(command, check=True)


def lossy_psnr() -> None:
    """RGB PSNR of each restored frame at the default CRF against the image path's restore, by frame size."""
    from tests.test_video import expected_frames, make_clip as make_test_clip, psnr
    from tests.trained_model import CHECKPOINT

    from mprnet_cli.video import read_frames

    restorer = Restorer.from_checkpoint(CHECKPOINT, precision="fp32", device="cpu")
    for (width, height), crf in (((48, 32), 18), ((128, 96), 18), ((320, 240), 18), ((128, 96), 15), ((128, 96), 12)):
        with tempfile.TemporaryDirectory() as folder:
            source = make_test_clip(Path(folder) / "clip.mkv", frames=4, width=width, height=height, codec="ffv1")
            target = Path(folder) / "restored.mkv"
            restore_video(restorer, source, target, encoding=Encoding(codec="h264", crf=crf))
            scores = [psnr(got, want) for (_, got), want in
                      zip(read_frames(target), expected_frames(restorer, source, "yuv420p"))]
            print(json.dumps({"size": f"{width}x{height}", "crf": crf, "psnr_db": [round(s, 1) for s in scores]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=TASKS, default="derain")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", default="1920x1080", help="WIDTHxHEIGHT")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--codecs", action="store_true", help="measure each codec's default quality instead")
    parser.add_argument("--flicker", action="store_true", help="measure flicker on static clips instead")
    parser.add_argument("--memory", action="store_true", help="measure peak memory over 50 and 500 frames instead")
    parser.add_argument("--memory-run", type=int, metavar="FRAMES", help=argparse.SUPPRESS)
    parser.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--psnr", action="store_true", help="measure the lossy round trip by frame size instead")
    arguments = parser.parse_args()
    if arguments.memory_run:
        memory_run(arguments.memory_run, arguments.resume)
        return
    modes = {"codecs": codec_quality, "flicker": flicker, "memory": memory, "psnr": lossy_psnr}
    for mode, measure in modes.items():
        if getattr(arguments, mode):
            measure()
            return
    width, height = (int(side) for side in arguments.size.split("x"))

    torch.manual_seed(0)
    restorer = Restorer(MPRNet(TASK_CONFIGS[arguments.task]), device=arguments.device, precision=arguments.precision)
    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder) / "clip.mp4", Path(folder) / "restored.mp4"
        make_clip(source, arguments.frames, width, height)
        started = time.perf_counter()
        summary = restore_video(restorer, source, target, encoding=Encoding())
        wall = time.perf_counter() - started
        import av

        with av.open(str(target)) as written:
            frames_out = sum(1 for _ in written.decode(video=0))
    shape = restorer.tile_shape_for(height, width)
    result = {
        "task": arguments.task, "size": arguments.size, "device": str(restorer.device),
        "precision": str(restorer.dtype).removeprefix("torch."), "tiles": "whole" if shape is None else f"{shape[1]}x{shape[0]}",
        "frames_in": arguments.frames, "frames_out": frames_out, "seconds": round(wall, 2),
        "fps": round(summary.frames / wall, 4), "network_busy": round(summary.compute_seconds / summary.seconds, 4),
        "machine": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
