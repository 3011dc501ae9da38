"""Restore video clips in one streaming pass: containers, frames, sound and colour.

A clip runs as three stages joined by small bounded queues, like a batch of images
(`mprnet_cli.pipeline`): a reader thread demuxes and decodes, the calling thread runs the
network on one frame at a time, and a writer thread encodes and muxes. No frame touches
the disk and memory stays flat over any length.

What a clip keeps:
- its frames, exactly: every decoded frame is restored and written with its own
  presentation timestamp in the input's time base, so variable frame rates survive and
  the output has as many frames as the input (the container's frame count is only used
  for progress);
- its sound and subtitles, copied packet by packet where the output container takes
  their codec (left out with a warning where it does not);
- its colour: the stream's matrix and range are read (untagged: BT.709 from 720 lines
  up, BT.601 below, as players assume), used explicitly for YUV -> RGB and back, and
  written as tags with the primaries and transfer; 10-bit clips are restored as 16-bit
  RGB and written as 10-bit;
- its rotation (display matrix), container title, creation time and language tags.

PyAV is an optional dependency (`mprnet[video]`), imported only when a clip is opened.
The network code is the `Restorer`'s; this module never tiles or chooses a precision.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import json
import logging
import os
import queue
import shutil
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

import numpy as np

from mprnet_cli.errors import InputError, MprnetError, OutputError
from mprnet_cli.imageio import atomic_file, write_atomic

if TYPE_CHECKING:
    from mprnet_cli.model.restorer import Restorer

logger = logging.getLogger("mprnet")

#: Video file extensions and the FFmpeg muxer that writes each.
CONTAINERS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm",
              ".avi": "avi", ".ts": "mpegts"}
#: Containers that can be written to a pipe: mp4 and mov seek back to write their index.
PIPE_CONTAINERS = {".mkv", ".ts"}


@dataclass(frozen=True)
class Codec:
    """An encoder we write with: its FFmpeg name, default quality, and how a preset is given."""

    encoder: str
    #: Visually lossless for the codec's scale; None: lossless, no --crf.
    crf: int | None
    #: The encoder option a `--preset` sets, and the values it takes (None: any integer in range).
    preset_option: str | None
    presets: tuple[str, ...] = ()
    preset_range: tuple[int, int] | None = None
    #: Extra options the rate control needs (libvpx-vp9 uses CRF only with no bitrate).
    options: dict[str, str] = field(default_factory=dict)


_X26X_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow", "placebo")

#: `--codec` names, by family.
CODECS = {
    "h264": Codec("libx264", 18, "preset", _X26X_PRESETS),
    "hevc": Codec("libx265", 20, "preset", _X26X_PRESETS, options={"x265-params": "log-level=error"}),
    "av1": Codec("libsvtav1", 24, "preset", preset_range=(0, 13)),
    "vp9": Codec("libvpx-vp9", 20, "cpu-used", preset_range=(0, 8), options={"b": "0"}),
    "ffv1": Codec("ffv1", None, None),
}
#: Decoder and encoder names by family: an input codec whose family we can encode is
#: written in it; any other as H.264.
_FAMILIES = {"h264": "h264", "libx264": "h264", "hevc": "hevc", "libx265": "hevc", "av1": "av1", "libdav1d": "av1",
             "libsvtav1": "av1", "vp9": "vp9", "libvpx-vp9": "vp9", "ffv1": "ffv1"}

# FFmpeg's enumerations (libavutil/pixfmt.h), as the stream and frame attributes hold them.
_MATRIX_BT709, _MATRIX_UNSPECIFIED, _MATRIX_FCC, _MATRIX_BT470BG, _MATRIX_SMPTE170M, _MATRIX_SMPTE240M = 1, 2, 4, 5, 6, 7
_MATRIX_BT2020_NCL, _MATRIX_BT2020_CL = 9, 10
_RANGE_UNSPECIFIED, _RANGE_LIMITED, _RANGE_FULL = 0, 1, 2
_TRANSFER_PQ, _TRANSFER_HLG = 16, 18
#: The matrix names swscale takes, by FFmpeg's matrix number.
_SWSCALE_MATRICES = {_MATRIX_BT709: "itu709", _MATRIX_FCC: "fcc", _MATRIX_BT470BG: "itu601", _MATRIX_SMPTE170M: "itu601",
                     _MATRIX_SMPTE240M: "smpte240m", _MATRIX_BT2020_NCL: "bt2020", _MATRIX_BT2020_CL: "bt2020"}
#: x265 in PyAV 18.1's wheel corrupted its heap and aborted the process on 48x32, 40x40,
#: 48x48 and 48x64 frames (64x16, 64x32, 56x48 and 32x64 went through): narrower frames are
#: refused rather than risked.
X265_MIN_WIDTH = 64
#: Players take an untagged clip this tall or taller for HD (BT.709), shorter for SD (BT.601).
HD_LINES = 720
#: Container and stream tags that describe the old file rather than the clip.
_STALE_TAGS = {"encoder", "major_brand", "minor_version", "compatible_brands", "duration", "number_of_frames",
               "number_of_bytes", "bps", "_statistics_writing_app", "_statistics_writing_date_utc", "_statistics_tags"}

#: The nominal frame rate given to the encoder when the container states none (every
#: frame keeps its own timestamp all the same).
DEFAULT_RATE = Fraction(25)
#: Seconds of video in each segment a resumable clip is encoded in (see docs/video.md: a
#: forced keyframe this often costs little, and an interruption loses at most this much).
SEGMENT_SECONDS = 10
#: The work folder's record of the command that made its segments.
_MANIFEST = "manifest.json"
#: Frames decoded ahead of the network, and restored frames waiting for the encoder.
QUEUE_DEPTH = 4

#: `progress(done, total)`: frames written so far, and the clip's frame count when known.
FrameProgress = Callable[[int, int | None], None]


@dataclass(frozen=True)
class Encoding:
    """How the restored frames are encoded; None: the default for the chosen codec."""

    codec: str | None = None
    crf: int | None = None
    preset: str | None = None


@dataclass(frozen=True)
class Span:
    """The part of a clip to restore: frames [first, stop) by index, or [start, end) in seconds."""

    first: int = 0
    stop: int | None = None
    start: float | None = None
    end: float | None = None

    @property
    def whole(self) -> bool:
        return self == Span()

    def before(self, index: int, seconds: float) -> bool:
        return index < self.first or (self.start is not None and seconds < self.start)

    def after(self, index: int, seconds: float) -> bool:
        return (self.stop is not None and index >= self.stop) or (self.end is not None and seconds >= self.end)


@dataclass(frozen=True)
class VideoSummary:
    """What a restored clip holds, and what it cost."""

    frames: int
    width: int
    height: int
    #: Seconds of video written (first frame to the end of the last).
    duration: float
    #: Frames that decoded with errors (restored as decoded) or not at all (left out).
    damaged: int
    seconds: float
    #: Time the network spent (the rest is decoding, encoding and waiting for them).
    compute_seconds: float


def import_av(label: str) -> ModuleType:
    """PyAV, or one line on how to install it."""
    try:
        import av
    except ImportError:
        raise InputError(f"{label}: video needs PyAV: pip install 'mprnet[video]'") from None
    return av


def is_video_path(path: str | Path) -> bool:
    return Path(path).suffix.lower() in CONTAINERS


def check_encoding(encoding: Encoding) -> None:
    """Refuse a codec, CRF or preset that cannot work, before any model is loaded."""
    if encoding.codec is not None and encoding.codec not in CODECS:
        raise OutputError(f"--codec {encoding.codec}: expected one of {', '.join(CODECS)}")
    if encoding.codec is None:
        return  # checked against the codec each clip's family chooses
    _encoder_options(CODECS[encoding.codec], encoding, encoding.codec)


def _encoder_options(codec: Codec, encoding: Encoding, family: str) -> dict[str, str]:
    options = dict(codec.options)
    if encoding.crf is not None and codec.crf is None:
        raise OutputError(f"--crf: {family} is lossless and takes no quality setting")
    crf = encoding.crf if encoding.crf is not None else codec.crf
    if crf is not None:
        if not 0 <= crf <= 63:
            raise OutputError(f"--crf {crf}: expected 0 to 63 (lower is better; {family}'s default is {codec.crf})")
        options["crf"] = str(crf)
    if encoding.preset is not None:
        preset = encoding.preset
        if codec.preset_option is None:
            raise OutputError(f"--preset: {family} has no presets")
        if codec.presets and preset not in codec.presets:
            raise OutputError(f"--preset {preset}: {family} takes {', '.join(codec.presets)}")
        if codec.preset_range is not None:
            low, high = codec.preset_range
            if not (preset.isdigit() and low <= int(preset) <= high):
                raise OutputError(f"--preset {preset}: {family} takes a number from {low} (slowest) to {high} (fastest)")
        options[codec.preset_option] = preset
    return options


@dataclass(frozen=True)
class Colour:
    """A stream's colour: FFmpeg's matrix, range, primaries and transfer numbers."""

    matrix: int
    range: int
    primaries: int
    transfer: int

    @classmethod
    def of(cls, frame: Any, label: str) -> Colour:
        """As tagged, with the players' guesses for what is not: the matrix by height,
        limited range unless the pixel format is a full-range (`yuvj`) one. `label` names
        the clip in the warning for a matrix swscale does not know."""
        matrix = frame.colorspace
        if matrix not in _SWSCALE_MATRICES:
            guess = _MATRIX_BT709 if frame.height >= HD_LINES else _MATRIX_SMPTE170M
            if matrix != _MATRIX_UNSPECIFIED:
                logger.warning("%s: colour matrix %d is not supported; converting as %s", label, matrix,
                               "BT.709" if guess == _MATRIX_BT709 else "BT.601")
            matrix = guess
        colour_range = frame.color_range
        if colour_range == _RANGE_UNSPECIFIED:
            colour_range = _RANGE_FULL if frame.format.name.startswith("yuvj") else _RANGE_LIMITED
        return cls(matrix, colour_range, frame.color_primaries, frame.color_trc)

    @property
    def swscale_matrix(self) -> str:
        return _SWSCALE_MATRICES[self.matrix]

    @property
    def hdr(self) -> bool:
        return self.transfer in (_TRANSFER_PQ, _TRANSFER_HLG)


@dataclass
class _Source:
    """What the reader learnt from the first frame: enough to open the output."""

    width: int
    height: int
    pixel_format: str
    deep: bool
    colour: Colour
    rotation: list[int] | None
    codec_name: str
    time_base: Fraction
    #: The first frame's timestamp, where a resumable clip's segments are counted from.
    start_pts: int
    rate: Fraction | None
    total: int | None


@dataclass
class _Frame:
    pixels: np.ndarray
    pts: int
    duration: int


@dataclass
class _Packet:
    """A copied (audio or subtitle) packet, for the output stream `index`."""

    packet: Any
    index: int


@dataclass
class _End:
    damaged: int


_ABORT = object()


@dataclass
class _Extent:
    """The stretch of output time the frames written so far cover, in the input's time base."""

    time_base: Fraction
    first: int | None = None
    end: int = 0

    def add(self, pts: int, duration: int) -> None:
        self.first = pts if self.first is None else min(self.first, pts)
        self.end = max(self.end, pts + duration)

    @property
    def seconds(self) -> float:
        return float((self.end - (self.first or 0)) * self.time_base)


@dataclass
class _Transcoder:
    """Sound for a container that cannot hold its codec: decoded by the input stream's own
    decoder (which the reader leaves alone) and encoded anew; PyAV's encoder converts the
    sample format, rate and frame size."""

    source: Any
    stream: Any

    def encode(self, packet: Any | None) -> list[Any]:
        """The packets for `packet`; None flushes the decoder and the encoder."""
        packets = [p for frame in self.source.decode(packet) for p in self.stream.encode(frame)]
        return packets + (self.stream.encode(None) if packet is None else [])


def restore_video(
    restorer: Restorer,
    source: str | Path | BinaryIO,
    target: str | Path | BinaryIO,
    *,
    container: str | None = None,
    encoding: Encoding = Encoding(),
    span: Span = Span(),
    progress: FrameProgress | None = None,
    source_label: str | None = None,
    target_label: str | None = None,
    resume: bool = False,
) -> VideoSummary:
    """Restore a clip from `source` (a path, or a readable binary file such as stdin) into
    `target` (a path, written atomically, or a writable binary file such as stdout).

    `container` names the output format by extension (`.mkv`); None takes it from the
    target path. Raises `MprnetError` with one line for anything a user can meet, naming
    the files by their labels (by default their paths, or stdin and stdout: a local copy of
    a store's object is named by its URI). The frames are restored by `restorer` with one
    tile shape for the whole clip.

    `resume` (paths only) encodes the clip in segments of `SEGMENT_SECONDS`, each kept in a
    work folder beside the target as it completes; the same call after an interruption
    restores only the segments that are missing, then joins them all without re-encoding.
    """
    label = source_label or (str(source) if isinstance(source, (str, Path)) else "stdin")
    av = import_av(label)
    extension = container or (Path(target).suffix.lower() if isinstance(target, (str, Path)) else None)
    if extension not in CONTAINERS:
        raise OutputError(f"{target}: not a video container; use one of {', '.join(CONTAINERS)}")
    if resume and not (isinstance(source, (str, Path)) and isinstance(target, (str, Path))):
        raise OutputError(f"{label}: --resume needs a clip file in and a file out, not a pipe")
    started = time.perf_counter()
    with _opened_input(av, source, label) as input_container:
        reader = _Reader(av, input_container, label, span, copy_streams=not resume)
        try:
            first = reader.first()
            if resume:
                frames, duration, compute = _restore_in_segments(av, restorer, reader, first, Path(source), Path(target),
                                                                 extension, encoding, span, progress)
            else:
                with atomic_file(Path(target)) if isinstance(target, (str, Path)) else \
                        contextlib.nullcontext(target) as handle:
                    writer = _open_writer(av, handle, first, reader, extension, encoding, target_label or (
                        str(target) if isinstance(target, (str, Path)) else "stdout"))
                    compute = _restore_frames(restorer, reader, first, writer, progress)
                frames, duration = writer.frames, writer.extent.seconds
        finally:
            reader.close()
    return VideoSummary(frames, first.width, first.height, duration, reader.damaged, time.perf_counter() - started,
                        compute)


def read_frames(source: str | Path | BinaryIO, span: Span = Span()) -> Iterator[tuple[int, np.ndarray]]:
    """(pts, HxWx3 RGB pixels) for each frame of a clip, converted as `restore_video`
    converts them (uint16 for deep colour): to build on the frames, or to compare a
    restored clip with its input."""
    label = str(source) if isinstance(source, (str, Path)) else "stdin"
    av = import_av(label)
    with _opened_input(av, source, label) as container:
        reader = _Reader(av, container, label, span, copy_streams=False)
        reader.first()
        for frame, pts in reader.frames():
            yield pts, reader.to_rgb(frame)


@contextlib.contextmanager
def _opened_input(av: ModuleType, source: str | Path | BinaryIO, label: str) -> Iterator[Any]:
    try:
        opened = av.open(str(source) if isinstance(source, (str, Path)) else source, "r")
    except FileNotFoundError:
        raise InputError(f"{label}: no such file") from None
    except av.FFmpegError as error:
        raise InputError(f"{label}: cannot read as a video ({_reason(error)})") from None
    except OSError as error:
        raise InputError(f"{label}: cannot read ({error.strerror or error})") from None
    try:
        yield opened
    finally:
        opened.close()


def _reason(error: Exception) -> str:
    """FFmpeg's message without PyAV's errno and path decorations."""
    return str(getattr(error, "strerror", None) or error)


class _Reader:
    """Demuxes and decodes in a thread; frames come out as RGB arrays, packets to copy as they are."""

    def __init__(self, av: ModuleType, container: Any, label: str, span: Span, copy_streams: bool = True) -> None:
        self._av, self._container, self._label, self._span = av, container, label, span
        if not container.streams.video:
            kind = "an audio-only file" if container.streams.audio else "no video stream"
            raise InputError(f"{label}: {kind}; nothing to restore")
        self.video = container.streams.video[0]
        if self.video.codec_context is None:
            raise InputError(f"{label}: the video codec is not supported by this FFmpeg build")
        # Frame threading stays off (PyAV's default): decoding costs little beside the
        # network, and threaded decoders were reported to hang when a loop leaves early.
        self.copied = [s for s in container.streams if s.type in ("audio", "subtitle")] if copy_streams else []
        self.items: queue.Queue[object] = queue.Queue(QUEUE_DEPTH)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._frames = self._decoded()
        self._colour: Colour | None = None
        self._deep = False
        #: Where the output's timestamps start, in the video's time base: 0 for a whole clip.
        self.offset = 0

    def first(self) -> _Source:
        """Decode up to the first frame in the span, on the calling thread, so that its
        errors are the caller's; `start` goes on in a thread."""
        first = next(self._frames, None)
        if first is None:
            raise InputError(f"{self._label}: no frames decode in the video stream" if self._span.whole
                             else f"{self._label}: no frames in the chosen part of the clip")
        frame, pts = first
        self._colour = Colour.of(frame, self._label)
        if self._colour.hdr:
            logger.warning("%s: HDR (PQ/HLG) video; its tags are kept, but the model was trained on SDR images",
                           self._label)
        components = frame.format.components
        self._deep = bool(components) and components[0].bits > 8
        if not self._span.whole:
            self.offset = pts
        matrix = next((side for side in frame.side_data if "DISPLAYMATRIX" in str(side.type)), None)
        rotation = np.frombuffer(bytes(matrix), dtype=np.int32).tolist() if matrix is not None else None
        rate = self.video.average_rate or self.video.guessed_rate or DEFAULT_RATE
        source = _Source(frame.width, frame.height, frame.format.name, self._deep, self._colour, rotation,
                         self.video.codec_context.name, self.video.time_base, pts, rate, self._expected_frames(rate))
        self._first: tuple[Any, int] | None = (frame, pts)
        return source

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mprnet-video-reader", daemon=True)
        self._thread.start()

    def frames(self) -> Iterator[tuple[Any, int]]:
        """(frame, pts) from the first on; copied packets are held on the way."""
        if self._first is not None:
            first, self._first = self._first, None
            yield first
        yield from self._frames

    def _expected_frames(self, rate: Fraction | None) -> int | None:
        """From the container, for progress only; None when it does not say."""
        count = self.video.frames or None
        if count is None and self._container.duration and rate:
            count = round(self._container.duration / 1_000_000 * rate)
        if count is None:
            return None
        if self._span.stop is not None:
            count = min(count, self._span.stop)
        if self._span.end is not None and rate:
            count = min(count, round(self._span.end * rate))
        if self._span.start is not None and rate:
            count -= round(self._span.start * rate)
        return max(count - self._span.first, 0) or None

    def to_rgb(self, frame: Any) -> np.ndarray:
        """The frame as HxWx3 RGB (uint16 for deep colour), converted with the clip's own matrix and range."""
        colour = self._colour
        return frame.to_ndarray(format="rgb48le" if self._deep else "rgb24", src_colorspace=colour.swscale_matrix,
                                dst_colorspace=colour.swscale_matrix, src_color_range=colour.range,
                                dst_color_range=_RANGE_FULL, interpolation="BICUBIC")

    def _decoded(self) -> Iterator[tuple[Any, int]]:
        """(frame, pts) for each frame in the span, in presentation order; copied packets are queued on the way."""
        av, video, span = self._av, self.video, self._span
        self.damaged = self.decoded = 0
        self._held: deque[_Packet] = deque()
        origin = video.start_time or 0  # --start and --end count from the clip's first timestamp
        if span.start:
            self._container.seek(origin + int(span.start / video.time_base), stream=video, backward=True)
        index, last_pts, step = -1, None, 1
        demuxed = self._container.demux(video, *self.copied)
        while True:
            try:
                packet = next(demuxed)
            except StopIteration:
                break
            except av.FFmpegError as error:  # a truncated or damaged container: keep what came before
                logger.debug("demuxing %s stopped: %s", self._label, error)
                self.damaged += 1
                packet = None  # flush the decoder: the frames it holds are whole
            if packet is not None and packet.stream is not video:
                if packet.size:  # not the empty packet that ends each stream
                    self._held.append(_Packet(packet, self.copied.index(packet.stream)))
                continue
            try:
                frames = video.decode(packet)
            except av.FFmpegError as error:
                logger.debug("decoding a packet of %s failed: %s", self._label, error)
                self.damaged += 1
                continue
            for frame in frames:
                if frame.is_corrupt:
                    self.damaged += 1
                pts = frame.pts if frame.pts is not None else (last_pts + step if last_pts is not None else 0)
                if last_pts is not None and pts > last_pts:
                    step = pts - last_pts
                last_pts = pts
                index += 1
                seconds = float((pts - origin) * video.time_base)
                if span.before(index, seconds):
                    continue
                if span.after(index, seconds):
                    return
                #: Where the last frame sent ends, on the stream's clock (as packets are timed).
                self.end_seconds = float((pts + (frame.duration or step)) * video.time_base)
                self.decoded += 1
                yield frame, pts
            if packet is None:
                break
        if span.whole:
            self.damaged += self._missing_at_end()

    def _missing_at_end(self) -> int:
        """Frames the container announces beyond those that decoded: a truncated file can
        end cleanly for the demuxer. From the stream's frame count (MP4, MOV, AVI), else
        Matroska's DURATION tag, else the file's duration when it holds nothing but the
        video. MPEG-TS announces none of them: a file that ends inside one of its fixed-size
        packets was cut, and counts one frame (the cut one; how many followed is unknown)."""
        video = self.video
        if self._container.format.name == "mpegts":
            size = self._container.size
            return int(size > 0 and all(size % packet for packet in _TS_PACKET_SIZES))
        if video.frames:
            return max(video.frames - self.decoded, 0)
        end = None  # not from video.duration: FFmpeg fills it from the longest stream's
        if "DURATION" in video.metadata:
            hours, minutes, seconds = video.metadata["DURATION"].split(":")
            end = int(hours) * 3600 + int(minutes) * 60 + float(seconds)
        elif self._container.duration and len(self._container.streams) == 1:
            end = self._container.duration / 1_000_000
        rate = video.average_rate or video.guessed_rate
        if end is None or not rate or not self.decoded:
            return 0
        decoded_end = self.end_seconds - float((video.start_time or 0) * video.time_base)
        return max(round((end - decoded_end) * rate), 0)

    def _run(self) -> None:
        """The thread: the first frame (already decoded), then the rest, then the end."""
        try:
            for frame, pts in self.frames():
                if not self._send_frame(frame, pts):
                    return
            while self._held:  # the packets after the last frame (up to its end, for a part of the clip)
                if not self._span.whole and _seconds(self._held[0].packet) >= self.end_seconds:
                    break
                if not self._put(self._held.popleft()):
                    return
            self._put(_End(self.damaged))
        except Exception as error:  # a dead reader would stall the clip: hand the error over
            logger.debug("reading %s failed", self._label, exc_info=True)
            self._put(error if isinstance(error, MprnetError) else
                      InputError(f"{self._label}: cannot decode ({type(error).__name__}: {error})"))

    def _send_frame(self, frame: Any, pts: int) -> bool:
        # Copied packets go out as the video reaches their time, which keeps both in step.
        seconds = float(pts * self.video.time_base)
        while self._held and _seconds(self._held[0].packet) <= seconds:
            if not self._put(self._held.popleft()):
                return False
        duration = frame.duration or 0
        return self._put(_Frame(self.to_rgb(frame), pts, duration))

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self.items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


class _Copies:
    """The output's audio and subtitle streams, copied packet by packet from the input's;
    sound the container cannot hold is re-encoded, a subtitle it cannot hold left out."""

    def __init__(self, av: ModuleType, output: Any, streams: list[Any], offset: int, time_base: Fraction,
                 label: str) -> None:
        self._av, self._output, self._label = av, output, label
        #: Where the output's clock starts, in the input video's time base (0 for a whole clip).
        self._offset, self._time_base = offset, time_base
        self._streams = [self._add(stream) for stream in streams]

    def _add(self, stream: Any) -> Any | None:
        """An output stream for a copied audio or subtitle stream, or None where the container cannot hold it."""
        name = stream.codec_context.name if stream.codec_context is not None else "unknown"
        if not _container_takes(self._output, name):
            if stream.type == "audio":
                return self._add_transcoder(stream, name)
            logger.warning("%s: a %s stream (%s) cannot be written to %s and is left out", self._label, stream.type,
                           name, self._output.format.name)
            return None
        try:
            copy = self._output.add_stream_from_template(stream)
        except (ValueError, self._av.FFmpegError) as error:
            logger.warning("%s: a %s stream (%s) is left out: %s", self._label, stream.type, name, _reason(error))
            return None
        _copy_tags(stream.metadata, copy.metadata)
        return copy

    def _add_transcoder(self, stream: Any, name: str) -> _Transcoder | None:
        codec = next((c for c in ("libopus", "aac") if _container_takes(self._output, c)), None)
        if codec is None:
            logger.warning("%s: the sound (%s) cannot go into this container and is left out; "
                           "choose .mkv to keep it", self._label, name)
            return None
        logger.warning("%s: the sound (%s) cannot go into this container; re-encoded as %s",
                       self._label, name, codec.removeprefix("lib"))
        rate = 48_000 if codec == "libopus" else stream.codec_context.sample_rate  # Opus runs at 48 kHz
        encoded = self._output.add_stream(codec, rate=rate, layout=stream.codec_context.layout.name)
        _copy_tags(stream.metadata, encoded.metadata)
        return _Transcoder(stream, encoded)

    def mux(self, item: _Packet) -> None:
        stream = self._streams[item.index]
        if stream is None:
            return
        packet = item.packet
        if self._offset:
            # In the input video's time base: the output's may have changed when its header was written.
            shift = int(self._offset * self._time_base / packet.time_base)
            if packet.pts is not None and packet.pts < shift:
                return  # before the chosen part
            packet.pts = packet.pts - shift if packet.pts is not None else None
            packet.dts = packet.dts - shift if packet.dts is not None else None
        if isinstance(stream, _Transcoder):
            self._output.mux(stream.encode(packet))
            return
        packet.stream = stream
        self._output.mux(packet)

    def flush(self) -> None:
        """The sound still held by the re-encoders."""
        for stream in self._streams:
            if isinstance(stream, _Transcoder):
                self._output.mux(stream.encode(None))


class _Writer:
    """Encodes and muxes in a thread, into an output container it closes when finished."""

    def __init__(self, av: ModuleType, output: Any, source: _Source, reader: _Reader, extension: str,
                 encoding: Encoding, label: str) -> None:
        self._av, self._output, self._label = av, output, label
        self._colour, self._deep = source.colour, source.deep
        self._offset = reader.offset
        self.stream = self._add_video(source, extension, encoding)
        _copy_tags(reader.video.metadata, self.stream.metadata)
        self._copies = _Copies(av, output, reader.copied, reader.offset, source.time_base, label)
        _copy_tags(reader._container.metadata, output.metadata)
        self.items: queue.Queue[object] = queue.Queue(QUEUE_DEPTH)
        self.error: MprnetError | None = None
        self.frames = 0
        self.extent = _Extent(source.time_base)
        self._thread = threading.Thread(target=self._run, name="mprnet-video-writer", daemon=True)
        self._thread.start()

    def wants(self, pts: int) -> bool:
        return True

    def _add_video(self, source: _Source, extension: str, encoding: Encoding) -> Any:
        family = encoding.codec or _default_family(source, self._output)
        codec = CODECS[family]
        if codec.encoder == "libx265" and source.width < X265_MIN_WIDTH:
            raise OutputError(f"{self._label}: hevc is not written narrower than {X265_MIN_WIDTH} pixels here "
                              f"({source.width}x{source.height}); use --codec h264 or ffv1")
        if not _container_takes(self._output, codec.encoder):
            raise OutputError(f"{self._label}: a {extension} file cannot hold {family} video; "
                              "choose another --codec or output extension")
        options = _encoder_options(codec, encoding, family)
        if codec.encoder == "libsvtav1":
            # SVT-AV1 prints a banner of settings on stderr, which is ours; errors only
            # (it reads this when an encoder opens). A user's own setting wins.
            os.environ.setdefault("SVT_LOG", "1")
        stream = self._output.add_stream(codec.encoder, rate=source.rate, options=options)
        stream.width, stream.height = source.width, source.height
        stream.pix_fmt = _pixel_format(codec.encoder, source, self._av)
        stream.time_base = source.time_base
        context = stream.codec_context
        context.time_base = source.time_base
        colour = self._colour
        context.colorspace, context.color_range = colour.matrix, colour.range
        context.color_primaries, context.color_trc = colour.primaries, colour.transfer
        if source.rotation is not None:
            stream.set_display_matrix(source.rotation)
        return stream

    def put(self, item: object) -> None:
        """Queue an item, or raise the writer's error if it has stopped."""
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.items.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _run(self) -> None:
        try:
            while True:
                item = self.items.get()
                if item is _ABORT:
                    return
                if isinstance(item, _Frame):
                    self._encode(item)
                elif isinstance(item, _Packet):
                    self._copies.mux(item)
                else:
                    self._output.mux(self.stream.encode())
                    self._copies.flush()
                    return
        except Exception as error:  # the caller's loop raises it on its next frame
            logger.debug("writing %s failed", self._label, exc_info=True)
            self.error = error if isinstance(error, MprnetError) else \
                OutputError(f"{self._label}: cannot encode ({_reason(error)})")
            with contextlib.suppress(queue.Empty):  # free the caller if it waits on a full queue
                while True:
                    self.items.get_nowait()

    def _encode(self, item: _Frame) -> None:
        colour, av = self._colour, self._av
        frame = av.VideoFrame.from_ndarray(item.pixels, format="rgb48le" if self._deep else "rgb24")
        frame = frame.reformat(format=self.stream.pix_fmt, src_colorspace=colour.swscale_matrix,
                               dst_colorspace=colour.swscale_matrix, src_color_range=_RANGE_FULL,
                               dst_color_range=colour.range, interpolation="BICUBIC")
        frame.pts = item.pts - self._offset
        frame.time_base = self.stream.codec_context.time_base
        self.extent.add(frame.pts, item.duration)
        self._output.mux(self.stream.encode(frame))
        self.frames += 1

    def finish(self) -> None:
        """Flush the encoder and close the container; raises the writer's error, if any."""
        self.put(_End(0))
        self._thread.join()
        if self.error is not None:
            raise self.error
        self._output.close()

    def abort(self) -> None:
        with contextlib.suppress(queue.Full):
            self.items.put_nowait(_ABORT)
        # A writer blocked on nothing ends at _ABORT; one mid-encode finishes that frame first.
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self.items.get_nowait()
            with contextlib.suppress(queue.Full):
                self.items.put_nowait(_ABORT)
            self._thread.join(timeout=0.05)
        with contextlib.suppress(Exception):
            self._output.close()


def _open_writer(av: ModuleType, handle: BinaryIO, source: _Source, reader: _Reader, extension: str,
                 encoding: Encoding, label: str) -> _Writer:
    try:
        output = av.open(handle, "w", format=CONTAINERS[extension])
    except (av.FFmpegError, ValueError) as error:
        raise OutputError(f"{label}: cannot write {extension} ({_reason(error)})") from None
    try:
        return _Writer(av, output, source, reader, extension, encoding, label)
    except BaseException:
        with contextlib.suppress(Exception):
            output.close()
        raise


class _Sink(Protocol):
    """Where restored frames go: one writer, or one writer per segment."""

    def wants(self, pts: int) -> bool: ...
    def put(self, item: object) -> None: ...
    def finish(self) -> None: ...
    def abort(self) -> None: ...


def _restore_frames(restorer: Restorer, reader: _Reader, source: _Source, sink: _Sink,
                    progress: FrameProgress | None, tiles: tuple[int, int] | None | str = "choose") -> float:
    """The network loop between reader and `sink`, for the frames the sink wants; the compute seconds.
    `tiles` holds a tile shape chosen earlier (by a run being resumed) rather than choosing one now.

    On a GPU with room for several whole frames, that many go through each forward (read
    ahead from the reader's queue); everything reaches the sink in the reader's order."""
    compute = 0.0
    done = 0
    pending: list[object] = []  # items read but not yet handed on, wanted frames among them
    wanted: list[_Frame] = []

    def hand_on() -> None:
        nonlocal compute, done
        if wanted:
            computing = time.perf_counter()
            for frame, pixels in zip(wanted, restorer.restore_frames([frame.pixels for frame in wanted])):
                frame.pixels = pixels
            compute += time.perf_counter() - computing
        for item in pending:
            if isinstance(item, _Frame):
                done += 1
                if progress is not None:
                    progress(done, source.total)
            sink.put(item)
        pending.clear()
        wanted.clear()

    try:
        reader.start()
        if progress is not None:
            progress(0, source.total)
        # Deep colour runs on the restorer's fp32 twin under precision auto: hold its tiles.
        restorer = restorer.restorer_for(np.dtype(np.uint16 if source.deep else np.uint8))
        with restorer.same_tiles(source.height, source.width, tiles):
            per_forward = restorer.frames_per_forward(source.height, source.width)
            while True:
                item = reader.items.get()
                if isinstance(item, MprnetError):
                    raise item
                if isinstance(item, _End):
                    hand_on()
                    break
                pending.append(item)
                if isinstance(item, _Frame) and sink.wants(item.pts):
                    wanted.append(item)
                if len(wanted) >= per_forward:
                    hand_on()
                    # Free memory moves: read again for the next batch (on the CPU, always 1).
                    per_forward = restorer.frames_per_forward(source.height, source.width)
                elif not wanted:  # sound, or a frame kept from a resumed run: nothing to wait for
                    hand_on()
        sink.finish()
    except BaseException:
        sink.abort()
        raise
    return compute


class _WorkFolder:
    """The hidden folder beside a resumable clip's target: its finished segments, and a
    manifest of what made them, which a resumed run must match."""

    def __init__(self, target: Path, extension: str, label: str) -> None:
        self.path = target.with_name(f".{target.name}.mprnet-parts")
        self._extension, self._label = extension, label
        #: Segments an earlier run of the same command finished, by index.
        self.finished: set[int] = set()
        #: The tile shape the segments were restored with (None: whole frames).
        self.tiles: tuple[int, int] | None = None

    def resume(self, identity: dict[str, object]) -> bool:
        """Whether an earlier run of this same command left segments to keep (listed in
        `finished`); False, with a warning, for a work folder another command made (which
        `start` then empties)."""
        try:
            manifest = json.loads((self.path / _MANIFEST).read_text())
        except FileNotFoundError:
            return False
        except (OSError, ValueError):
            manifest = None
        tiles = manifest.get("tiles") if isinstance(manifest, dict) else None
        if not isinstance(manifest, dict) or manifest.get("identity") != identity or not (
                tiles is None or (isinstance(tiles, list) and len(tiles) == 2 and all(isinstance(t, int) for t in tiles))):
            logger.warning("%s: the segments in %s were made by another command (input, options or weights differ); "
                           "starting over", self._label, self.path)
            return False
        self.tiles = (tiles[0], tiles[1]) if tiles else None
        for stale in self.path.glob(".mprnet-*.partial"):  # a segment being written when the run was killed
            stale.unlink(missing_ok=True)
        self.finished = {int(path.name.removesuffix(self._extension)) for path in self.path.iterdir()
                         if path.name.removesuffix(self._extension).isdigit()}
        return True

    def start(self, identity: dict[str, object], tiles: tuple[int, int] | None) -> None:
        """An empty work folder for this command, its manifest written first."""
        try:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path.mkdir()
            write_atomic(self.path / _MANIFEST, json.dumps({"identity": identity, "tiles": tiles}, indent=1).encode())
        except OSError as error:
            raise OutputError(f"{self.path}: cannot create the work folder ({error.strerror or error})") from None
        self.tiles, self.finished = tiles, set()

    def segment(self, index: int) -> Path:
        return self.path / f"{index:06d}{self._extension}"

    def segments(self) -> list[Path]:
        return sorted(self.path.glob(f"[0-9]*{self._extension}"))

    def remove(self) -> None:
        try:
            shutil.rmtree(self.path)
        except OSError as error:
            logger.warning("%s: cannot remove the work folder %s (%s)", self._label, self.path, error.strerror or error)


def _identity(av: ModuleType, restorer: Restorer, source: Path, extension: str, encoding: Encoding,
              span: Span) -> dict[str, object]:
    """What a resumed run must share with the run that made the segments: a segment made
    from another file, with other options, weights or encoder, would not match the rest."""
    state = restorer.model.state_dict()
    weights = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach()
        weights.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        weights.update(tensor.cpu().float().contiguous().numpy().tobytes())  # float: numpy has no bfloat16
    status = source.stat()
    return {
        "source": str(source.resolve()), "bytes": status.st_size, "modified_ns": status.st_mtime_ns,
        "container": extension, "encoding": asdict(encoding), "span": asdict(span), "weights": weights.hexdigest(),
        "device": restorer.device.type, "precision": str(restorer.dtype), "tile": restorer.tile,
        "tile_overlap": restorer.tile_overlap, "tile_blend": restorer.tile_blend,
        "tlc_train_size": restorer.tlc_train_size, "ensemble": restorer.ensemble,
        "segment_seconds": SEGMENT_SECONDS, "pyav": av.__version__,
    }


class _Segments:
    """Restored frames into one file per `SEGMENT_SECONDS` of the clip, each from a fresh
    encoder (so it starts at a keyframe and is encoded the same whatever ran before it) and
    renamed into the work folder whole; frames of segments already there are not restored."""

    def __init__(self, av: ModuleType, work: _WorkFolder, source: _Source, reader: _Reader, extension: str,
                 encoding: Encoding, label: str) -> None:
        self._av, self._work, self._source, self._reader = av, work, source, reader
        self._extension, self._encoding, self._label = extension, encoding, label
        self._last = 0  # segments only go forward, even should a damaged clip's timestamps not
        #: All the frames', those of finished segments too.
        self.extent = _Extent(source.time_base)
        self._current: tuple[int, contextlib.ExitStack, _Writer] | None = None

    def _index(self, pts: int) -> int:
        seconds = (pts - self._source.start_pts) * self._source.time_base
        return max(int(seconds // SEGMENT_SECONDS), self._last)

    def wants(self, pts: int) -> bool:
        return self._index(pts) not in self._work.finished

    def put(self, item: object) -> None:
        if not isinstance(item, _Frame):  # sound and subtitles join later, from the input
            return
        self.extent.add(item.pts - self._reader.offset, item.duration)
        index = self._last = self._index(item.pts)
        if self._current is not None and self._current[0] != index:
            self._close()
        if index in self._work.finished:
            return
        if self._current is None:
            stack = contextlib.ExitStack()
            try:
                handle = stack.enter_context(atomic_file(self._work.segment(index)))
                writer = _open_writer(self._av, handle, self._source, self._reader, self._extension, self._encoding,
                                      self._label)
            except BaseException as error:
                stack.__exit__(type(error), error, error.__traceback__)
                raise
            self._current = (index, stack, writer)
        self._current[2].put(item)

    def _close(self) -> None:
        _, stack, writer = self._current  # type: ignore[misc]
        writer.finish()
        stack.close()  # the segment is complete: renamed into place
        self._current = None

    def finish(self) -> None:
        if self._current is not None:
            self._close()

    def abort(self) -> None:
        if self._current is None:
            return
        _, stack, writer = self._current
        self._current = None
        writer.abort()
        error = sys.exc_info()[1] or OutputError(f"{self._label}: stopped")
        with contextlib.suppress(BaseException):  # the error on its way up is the caller's
            stack.__exit__(type(error), error, error.__traceback__)  # removes the unfinished segment


def _restore_in_segments(av: ModuleType, restorer: Restorer, reader: _Reader, source: _Source, source_path: Path,
                         target: Path, extension: str, encoding: Encoding, span: Span,
                         progress: FrameProgress | None) -> tuple[int, float, float]:
    """`--resume`: restore the segments the work folder lacks, join them all into `target`,
    then remove the folder; (frames, seconds of video, compute seconds)."""
    label = str(source_path)
    network = restorer.restorer_for(np.dtype(np.uint16 if source.deep else np.uint8))
    work = _WorkFolder(target, extension, label)
    identity = _identity(av, network, source_path, extension, encoding, span)
    if work.resume(identity):
        if work.finished:
            logger.info("%s: resuming: %d finished segment(s) kept from an earlier run", label, len(work.finished))
    else:
        work.start(identity, network.tile_shape_for(source.height, source.width))
    segments = _Segments(av, work, source, reader, extension, encoding, label)
    compute = _restore_frames(restorer, reader, source, segments, progress, work.tiles)
    frames = _join(av, work.segments(), source_path, target, source, reader, extension, label)
    work.remove()
    return frames, segments.extent.seconds, compute


def _join(av: ModuleType, segments: list[Path], source_path: Path, target: Path, source: _Source, reader: _Reader,
          extension: str, label: str) -> int:
    """The segments' video packets, in order and untouched, with the input's sound and
    subtitles, into `target`; the frames written."""
    with _opened_input(av, segments[0], str(segments[0])) as first:
        template = first.streams.video[0]
        with atomic_file(target) as handle:
            output = av.open(handle, "w", format=CONTAINERS[extension])
            try:
                with _opened_input(av, source_path, label) as original:
                    video = output.add_stream_from_template(template)
                    _copy_tags(original.streams.video[0].metadata, video.metadata)
                    copied = [s for s in original.streams if s.type in ("audio", "subtitle")]
                    copies = _Copies(av, output, copied, reader.offset, source.time_base, str(target))
                    _copy_tags(original.metadata, output.metadata)
                    offset = float(reader.offset * source.time_base)
                    whole = reader._span.whole
                    sound = ((_seconds(p) - offset, 1, _Packet(p, copied.index(p.stream)))
                             for p in (original.demux(*copied) if copied else ())  # demux() alone: every stream
                             if p.size and (whole or _seconds(p) < reader.end_seconds))
                    pictures = ((_seconds(p), 0, p) for p in _packets(av, segments))
                    frames = 0
                    for _, kind, item in heapq.merge(pictures, sound, key=lambda entry: (entry[0], entry[1])):
                        if kind:
                            copies.mux(item)
                            continue
                        item.stream = video
                        output.mux(item)
                        frames += 1
                    copies.flush()
                output.close()
            except av.FFmpegError as error:  # the segments stay for another try
                with contextlib.suppress(Exception):
                    output.close()
                raise OutputError(f"{target}: cannot join the segments ({_reason(error)})") from None
            except BaseException:
                with contextlib.suppress(Exception):
                    output.close()
                raise
    return frames


def _packets(av: ModuleType, paths: list[Path]) -> Iterator[Any]:
    """The video packets of each file in turn, one file open at a time.

    Matroska stores no decoding times: its demuxer guesses them, and cannot for the first
    packets of each file, which would leave the joined stream with gaps at every segment.
    Those are left to the muxer, which derives them from the presentation times across
    the whole stream, as it does for the encoder's packets in one pass."""
    for path in paths:
        with _opened_input(av, path, str(path)) as segment:
            guessed = segment.format.name.startswith("matroska")
            for packet in segment.demux(video=0):
                if packet.size:
                    if guessed:
                        packet.dts = None
                    yield packet


def _seconds(packet: Any) -> float:
    """When a packet is due: its decoding time, else its presentation time (Matroska stores no dts)."""
    stamp = packet.dts if packet.dts is not None else packet.pts
    return float((stamp or 0) * packet.time_base)


def _container_takes(output: Any, codec_name: str) -> bool:
    """Whether the output container can hold this codec."""
    family = _FAMILIES.get(codec_name, codec_name)
    supported = _MPEGTS_CODECS if output.format.name == "mpegts" else output.supported_codecs
    return codec_name in supported or family in supported


#: MPEG-TS packet sizes: plain, with a 4-byte timestamp (M2TS), with 16 bytes of error correction.
_TS_PACKET_SIZES = (188, 192, 204)
#: FFmpeg's MPEG-TS muxer has no codec table to ask; these are the codecs it writes.
_MPEGTS_CODECS = {"h264", "hevc", "mpeg2video", "aac", "mp2", "mp3", "ac3", "eac3", "opus", "dvbsub", "dvb_teletext"}


def _default_family(source: _Source, output: Any) -> str:
    """The input's codec family where we encode it and the container holds it, else H.264
    (VP9 for WebM); 10-bit clips go to a codec that writes 10 bits."""
    family = _FAMILIES.get(source.codec_name, "h264")
    if source.deep and family == "vp9":  # this libvpx build writes 8 bits only
        family = "av1"
    for candidate in (family, "h264", "vp9"):
        if _container_takes(output, CODECS[candidate].encoder):
            return candidate
    return family


def _pixel_format(encoder: str, source: _Source, av: ModuleType) -> str:
    """The source's own chroma layout and depth where the encoder takes them, else the
    nearest it does; 4:4:4 for odd sizes, which subsampled chroma cannot cover."""
    formats = [f.name for f in av.Codec(encoder, "w").video_formats or ()]
    name = source.pixel_format.replace("yuvj", "yuv")
    chroma = next((c for c in ("420", "422", "444") if f"yuv{c}p" in name), "420")
    odd = source.width % 2 or source.height % 2
    depth = "10le" if source.deep else ""
    candidates = [name] if name in formats and not (odd and chroma != "444") else []
    for layout in (["444"] if odd else [chroma, "420"]):
        candidates += [f"yuv{layout}p{depth}", f"yuv{layout}p"]
    chosen = next((c for c in candidates if c in formats), None)
    if chosen is None:
        raise OutputError(f"{encoder} cannot encode {source.width}x{source.height} {source.pixel_format} frames; "
                          "try --codec h264 or --codec ffv1")
    if source.deep and "10" not in chosen and "16" not in chosen and "12" not in chosen:
        logger.warning("%s writes 8 bits per sample; the 10-bit input loses depth (--codec hevc keeps it)", encoder)
    return chosen


def _copy_tags(source: dict[str, str], target: dict[str, str]) -> None:
    for key, value in source.items():
        if key.lower() not in _STALE_TAGS:
            target[key] = value
