"""Whether x264 (as PyAV's wheel bundles it) writes the same bytes for the same frames in
every process, and what making it do so would cost.

Each encode runs in a fresh process with glibc's `MALLOC_PERTURB_` set to a different
byte, which fills memory handed out by malloc (and freed memory) with it: an encoder
that reads memory it never wrote then gives different streams, where a correct one
gives one. Frames are converted to YUV once, in this process, and handed over as bytes,
so the encoder's input is identical in every run. One thread, x264's defaults at CRF 18,
then the same with its macroblock tree off (`mbtree=0`), with bytes and PSNR.

    python benchmarks/x264_repeatability.py
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys

import av
import numpy as np

from mprnet_cli.metrics import psnr

PERTURB = (0, 1, 165, 77)
#: (width, height) of the synthetic clips: moving waves plus seeded noise, 40 frames.
SIZES = ((320, 240), (1280, 720))


def clip(width: int, height: int, frames: int = 40) -> np.ndarray:
    """YUV 4:2:0 frames, (frames, height * 3 / 2, width), as PyAV lays them out."""
    rng = np.random.default_rng(width)
    y, x = np.mgrid[0:height, 0:width]
    rgb = [np.clip(np.stack([np.sin(x / 9 + t / 3), np.cos(y / 7 - t / 5), np.sin((x + y) / 13 + t / 4)], -1) * 90
                   + 128 + rng.normal(0, 3, (height, width, 3)), 0, 255).astype(np.uint8) for t in range(frames)]
    return np.stack([av.VideoFrame.from_ndarray(f, format="rgb24").reformat(
        format="yuv420p", src_colorspace="itu709", dst_colorspace="itu709", src_color_range="JPEG",
        dst_color_range="MPEG", interpolation="BICUBIC").to_ndarray() for f in rgb])


def encode(frames: np.ndarray, params: str) -> bytes:
    output = io.BytesIO()
    with av.open(output, "w", format="h264") as container:
        options = {"crf": "18", "threads": "1", **({"x264-params": params} if params else {})}
        stream = container.add_stream("libx264", rate=30, options=options)
        stream.height, stream.width = frames.shape[1] * 2 // 3, frames.shape[2]
        stream.pix_fmt = "yuv420p"
        for index, planes in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(planes, format="yuv420p")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return output.getvalue()


def decoded_psnr(frames: np.ndarray, stream: bytes) -> float:
    with av.open(io.BytesIO(stream), format="h264") as container:
        decoded = np.stack([f.to_ndarray(format="yuv420p") for f in container.decode(video=0)])
    return psnr(decoded, frames, peak=255.0)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":  # frames on stdin, the stream on stdout
        frames = np.load(io.BytesIO(sys.stdin.buffer.read()))
        sys.stdout.buffer.write(encode(frames, sys.argv[2]))
        return
    print("| clip | x264-params | distinct streams in 4 runs | bytes | PSNR (Y'CbCr) |\n|---|---|---:|---:|---:|")
    for width, height in SIZES:
        frames = clip(width, height)
        saved = io.BytesIO()
        np.save(saved, frames)
        for params in ("", "mbtree=0"):
            streams = [subprocess.run([sys.executable, __file__, "--child", params], input=saved.getvalue(),
                                      capture_output=True, check=True,
                                      env={**os.environ, "MALLOC_PERTURB_": str(byte)}).stdout for byte in PERTURB]
            distinct = len({hashlib.sha256(s).digest() for s in streams})
            print(f"| {width}x{height} | {params or '(defaults)'} | {distinct} | {len(streams[0]):,} | "
                  f"{decoded_psnr(frames, streams[0]):.2f} dB |")


if __name__ == "__main__":
    main()
