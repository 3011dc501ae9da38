"""`Restorer`: load a network once, restore many images.

The published inference recipe lives here and only here: pixels to float in [0, 1],
reflect-pad bottom and right to a multiple of 8, run, keep the stage-3 image, crop,
clamp. Grayscale and alpha are handled around it so the network always sees RGB.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, overload

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mprnet_cli.devices import (
    is_emulated,
    is_out_of_memory,
    keep_freed_host_memory,
    memory_budget,
    release_freed_host_memory,
    resolve_device,
    resolve_precision,
)
from mprnet_cli.errors import DeviceError
from mprnet_cli.model.config import MPRNetConfig
from mprnet_cli.model.graphs import GraphReplay
from mprnet_cli.model.network import SIZE_MULTIPLE, MPRNet
from mprnet_cli.tiling import (
    DEFAULT_BLEND,
    DEFAULT_OVERLAP,
    MIN_TILE,
    Tile,
    TileGrid,
    check_tile_options,
    max_overlap,
    plan_tile_shape,
    round_up,
)

if TYPE_CHECKING:
    from PIL import Image


def pad_to_multiple(x: Tensor, multiple: int = SIZE_MULTIPLE) -> Tensor:
    """Reflect-pad bottom and right up to the next multiple (the published recipe).

    Reflection needs the pad to be shorter than the side, so sides under `multiple`
    reflect repeatedly, and a one-pixel side, which has nothing to reflect, repeats.
    """
    pad_h = -x.shape[-2] % multiple
    pad_w = -x.shape[-1] % multiple
    while pad_h or pad_w:
        step_h = min(pad_h, x.shape[-2] - 1)
        step_w = min(pad_w, x.shape[-1] - 1)
        if not step_h and not step_w:
            return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        x = F.pad(x, (0, step_w, 0, step_h), mode="reflect")
        pad_h, pad_w = pad_h - step_h, pad_w - step_w
    return x


logger = logging.getLogger("mprnet")

#: `progress(done, total)`: with 0 before the first tile, then after each batch of tiles.
Progress = Callable[[int, int], None]
#: `cut(top, left, height, width)`: a 1x3xhxw float tile of the image being restored.
TileCutter = Callable[[int, int, int, int], Tensor]

#: On the CPU, at most this many pixels squared per tile: memory stays bounded (derain in
#: bf16 peaks at 2.4 GB RSS for a whole 1024x1024 image, 0.7 GB in tiles) and progress
#: steady (a 512x512 deblur tile takes 14 s on 2 cores). Speed does not ask for it: with
#: freed memory reused, the rate per pixel is flat (derain, bf16, whole images: 0.082 MP/s
#: at 512x512, 0.081 at 768x768, 0.083 at 1024x1024).
CPU_TILE_CAP = 512
#: Most tiles per forward on a GPU; beyond this the device is busy anyway.
MAX_TILE_BATCH = 16
#: Head-room over the measured probe peak (allocator fragmentation, cuDNN workspaces).
PROBE_SAFETY = 1.25
#: A shape is tried as a CUDA graph only when its forward needs at most this share of the
#: memory budget: a kept graph holds that memory (`mprnet_cli.model.graphs`).
GRAPH_MEMORY_SHARE = 0.1


def estimate_bytes_per_pixel(config: MPRNetConfig, dtype: torch.dtype, tlc: bool = False) -> float:
    """Peak memory per input pixel of one forward on the CPU, from the widths.

    The peak sits in stage 3, where full-resolution features of the ORSNet width live
    alongside the stage-2 U-Net features; ACTIVATION_COPIES was measured with
    benchmarks/memory.py --case per-pixel (peak RSS minus the RSS before the forward,
    over the pixels) and rounded up. With `tlc`, an attention's local means add their
    buffers on top (`TLC_BYTES_PER_CHANNEL`).
    """
    element = torch.empty((), dtype=dtype).element_size()
    activations = ACTIVATION_COPIES * (config.orsnet_width + config.n_feat) * element
    return activations + (TLC_BYTES_PER_CHANNEL * config.orsnet_width if tlc else 0.0)


#: Full-resolution feature maps held at the peak RSS, per channel of (ORSNet + U-Net
#: width), at the precision's element size: measured 7.7 to 10.9 in fp32 and 9.8 to 11.8
#: in bf16 across the three published widths, with freed memory kept for reuse (glibc's
#: heap then holds up to about 2.6 times the live maps, see
#: `mprnet_cli.devices.keep_freed_host_memory`). Measured before the freed pages were handed
#: back ahead of stage 3, which lowers the peak: a bound now rather than a fit.
ACTIVATION_COPIES = 12.0

#: TLC's extra peak memory per input pixel and ORSNet channel. Its buffers (a stage-3
#: attention's sums down the columns in fp32, nearly the map's size for small windows, and
#: its gate's rows) live inside one attention only, and on the CPU they land in memory the
#: heap already holds from the convolutions, so the peak hardly moves: benchmarks/memory.py
#: --case tlc, windows for 8-pixel crops (the most TLC keeps), measured +31 and +39 B/pixel
#: in bf16 and +42 and -193 in fp32 at 1024x1024 for derain's 56 channels, and nothing
#: beyond the noise (-212, -742) at 512x512. Rounded up; see docs/quality.md.
TLC_BYTES_PER_CHANNEL = 1.0

#: `ensemble`'s choices, and its transforms as (flip left-right, quarter turns), in the
#: order they are taken: 2 adds the mirror image, 4 is the four rotations (as MIMO-UNet's
#: +0.23 dB on GoPro was measured), 8 every rotation with and without the mirror.
ENSEMBLE_TRANSFORMS = {
    1: [(False, 0)],
    2: [(False, 0), (True, 0)],
    4: [(False, 0), (False, 1), (False, 2), (False, 3)],
    8: [(flip, turns) for flip in (False, True) for turns in range(4)],
}
ENSEMBLE_SIZES = tuple(ENSEMBLE_TRANSFORMS)

_INTEGER_SCALE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}


class Restorer:
    """An MPRNet on a device, ready to restore images of any size.

    `restore` takes and returns numpy arrays (HxW, HxWx1, HxWx2, HxWx3 or HxWx4; uint8,
    uint16 or float in [0, 1]) or PIL images, keeping dtype, mode and alpha.

    `precision` defaults to fp32, the exact reference; "auto" (the command line's default)
    picks bf16 where the hardware computes it natively, for 8-bit images only: bf16 keeps
    about 8 bits, so 16-bit and float images run in fp32, from a full-precision copy of the
    model made when first needed.

    Tiling: `tile=None` (auto) runs the whole image when it fits the device's memory and
    tiles it otherwise; `0` always runs the whole image (the exact published recipe); `N`
    cuts N x N tiles overlapping by `tile_overlap` pixels, blended as `tile_blend` says
    (see `mprnet_cli.tiling`). `tile_batch` tiles go through the network per call (None:
    as many as the device has room for).

    Quality beyond the published recipe (docs/quality.md): `tlc_train_size` (None: off)
    switches on the test-time local converter, channel attention over windows fitted to
    training crops of that size (256 for the published weights); `ensemble` (1, 2, 4 or 8)
    averages the restorations of that many flips and rotations, at as many forwards.

    On CUDA, a shape that repeats (tiles of one size, images of one size) is replayed from
    a CUDA graph where that measured faster: small forwards, whose kernels take less time
    to run than to launch (`mprnet_cli.model.graphs`); `cuda_graphs=False` runs every
    forward eagerly, as does the restorer from its first out-of-memory error on.

    On the CPU, constructing one makes the process's malloc keep freed memory for reuse
    (`mprnet_cli.devices.keep_freed_host_memory`): about 10% faster forwards, and the RSS
    stays at its peak until the process exits. To keep that peak down, the freed pages are
    handed back once per input shape, before stage 3 (a forward pre-hook on the model).
    """

    def __init__(
        self,
        model: MPRNet,
        *,
        device: str | torch.device = "auto",
        precision: str = "fp32",
        tile: int | None = None,
        tile_overlap: int = DEFAULT_OVERLAP,
        tile_blend: str = DEFAULT_BLEND,
        tile_batch: int | None = None,
        cuda_graphs: bool = True,
        tlc_train_size: int | None = None,
        ensemble: int = 1,
    ) -> None:
        check_tile_options(tile, tile_overlap, tile_blend)
        if tile_batch is not None and tile_batch < 1:
            raise ValueError(f"tile_batch must be at least 1, got {tile_batch}")
        if ensemble not in ENSEMBLE_SIZES:
            raise ValueError(f"ensemble must be one of {', '.join(map(str, ENSEMBLE_SIZES))}, got {ensemble}")
        if tlc_train_size is not None:
            model.tlc_windows(tlc_train_size)  # a train size it cannot use is refused here, not mid-batch
        self.tlc_train_size, self.ensemble = tlc_train_size, ensemble
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.dtype = resolve_precision(precision, self.device)
        if is_emulated(self.dtype, self.device):
            logger.warning("this CPU has no bf16 instructions: bf16 runs emulated here, about 10 times slower "
                           "than fp32 (precision auto picks fp32 here)")
        # Under auto, deep images get an fp32 twin of this restorer; its model is copied
        # now, before the cast below rounds the weights, and moved to the device only if used.
        deep_in_fp32 = precision.strip().lower() == "auto" and self.dtype != torch.float32
        self._fp32_model: MPRNet | None = copy.deepcopy(model).eval() if deep_in_fp32 else None
        self._fp32_twin: Restorer | None = None
        self._options = {"tile": tile, "tile_overlap": tile_overlap, "tile_blend": tile_blend, "tile_batch": tile_batch,
                         "cuda_graphs": cuda_graphs, "tlc_train_size": tlc_train_size, "ensemble": ensemble}
        self.model = model.eval().to(device=self.device, dtype=self.dtype, memory_format=torch.channels_last)
        if self.device.type == "cpu":
            keep_freed_host_memory()  # no page faults for every feature map (see its docstring)
            _release_freed_memory_before_stage3(self.model)
        self.tile, self.tile_overlap, self.tile_blend, self.tile_batch = tile, tile_overlap, tile_blend, tile_batch
        self._bytes_per_pixel: float | None = None
        self._held_shapes: dict[tuple[int, int], tuple[int, int] | None] = {}
        # Not on ROCm, which PyTorch also calls "cuda": measured on NVIDIA GPUs only.
        use_graphs = cuda_graphs and self.device.type == "cuda" and torch.version.hip is None
        self._graphs = GraphReplay(self.device) if use_graphs else None

    @classmethod
    def from_checkpoint(cls, path: str | Path, task: str | None = None, **options: object) -> Restorer:
        """Load a checkpoint file (see `mprnet_cli.checkpoints`); `task` refuses another task's file."""
        from mprnet_cli.checkpoints import load_model

        return cls(load_model(Path(path), task), **options)  # type: ignore[arg-type]

    @torch.inference_mode()
    def restore_tensor(self, image: Tensor) -> Tensor:
        """Restore a float RGB batch (Bx3xHxW in [0, 1], any device) as one piece, by the
        published recipe; the result is float32 on the CPU.

        With `ensemble` above 1, the mean of the restorations of the batch's flips and
        rotations, each turned back, added up one forward at a time: the memory of one
        forward and one float32 result, however many are averaged. A tiled image is
        averaged per tile (this is what runs each batch of tiles): a tile's transforms
        see exactly that tile's pixels, so tiling and blending work as without them.
        """
        image = image.to(device=self.device, dtype=self.dtype)
        if self.ensemble == 1:
            return self._forward(image)
        total = None
        for flip, turns in ENSEMBLE_TRANSFORMS[self.ensemble]:
            restored = _untransform(self._forward(_transform(image, flip, turns)), flip, turns)
            total = restored if total is None else total.add_(restored)
            del restored
        return total.div_(self.ensemble)

    def _forward(self, image: Tensor) -> Tensor:
        height, width = image.shape[-2:]
        padded = pad_to_multiple(image.contiguous(memory_format=torch.channels_last))
        # TLC's windows are set for this forward only (the model may be shared); a CUDA
        # graph captured inside records the local pooling like any other kernel.
        attention = (contextlib.nullcontext() if self.tlc_train_size is None
                     else self.model.local_attention(self.tlc_train_size))
        with self.cudnn_settings(), attention:
            outputs = self.model(padded) if self._graphs is None else self._graphs(self.model, padded, self._graph_fits)
        # From a graph, `outputs` are its own buffers (in fp32 clamp_ writes into them);
        # .cpu() copies the result off the device before the next replay can overwrite it.
        return outputs[0][..., :height, :width].float().clamp_(0.0, 1.0).cpu()

    @contextlib.contextmanager
    def cudnn_settings(self) -> Iterator[None]:
        """On CUDA, for the forward only: cuDNN times its kernels on the first tile of each
        shape and keeps the fastest (tiles repeat one shape), and fp32 convolutions stay in
        true fp32, the exact reference, rather than the TF32 that PyTorch lets cuDNN use by
        default (10-bit mantissas). Only these two settings are touched, and put back after.

        PyTorch 2.9 and newer refuse to mix their per-operator precision setting with the
        older `allow_tf32` switch, so the switch is used only where the setting does not exist.
        """
        if self.device.type != "cuda":
            yield
            return
        cudnn = torch.backends.cudnn
        settings = [(cudnn, "benchmark", True)]
        if self.dtype == torch.float32:
            if hasattr(cudnn, "conv"):
                settings.append((cudnn.conv, "fp32_precision", "ieee"))
            else:
                settings.append((cudnn, "allow_tf32", False))
        saved = [(owner, name, getattr(owner, name)) for owner, name, _ in settings]
        try:
            for owner, name, value in settings:
                setattr(owner, name, value)
            yield
        finally:
            for owner, name, value in saved:
                setattr(owner, name, value)

    @overload
    def restore(self, image: np.ndarray, progress: Progress | None = None) -> np.ndarray: ...
    @overload
    def restore(self, image: Image.Image, progress: Progress | None = None) -> Image.Image: ...

    def restore(self, image: np.ndarray | Image.Image, progress: Progress | None = None) -> np.ndarray | Image.Image:
        """`progress(done, total)` is called with 0 before the first tile, then after each
        batch of tiles, when the image is tiled."""
        if isinstance(image, np.ndarray):
            return self.restore_array(image, progress)
        from PIL import Image

        if isinstance(image, Image.Image):
            return self._restore_pil(image, progress)
        raise TypeError(f"expected a numpy array or a PIL image, got {type(image).__name__}")

    def restore_array(self, array: np.ndarray, progress: Progress | None = None, *,
                      source_dtype: np.dtype | None = None) -> np.ndarray:
        """Any byte order in, the same out; HxWx1 stays HxWx1. `source_dtype`: the depth
        the pixels had before the caller made them float, which picks the precision under
        auto (default: the array's own)."""
        native = array.astype(array.dtype.newbyteorder("=")) if not array.dtype.isnative else array
        restored = self.restorer_for(source_dtype or array.dtype)._restore_native(native, progress)
        if array.ndim == 3 and array.shape[2] == 1:
            restored = restored[..., None]
        return restored.astype(array.dtype, copy=False)

    @property
    def deep_dtype(self) -> torch.dtype:
        """The precision 16-bit and float images run in (fp32 under auto, else `dtype`)."""
        return torch.float32 if self._fp32_model is not None or self._fp32_twin is not None else self.dtype

    def restorer_for(self, dtype: np.dtype) -> Restorer:
        """This restorer, or for images deeper than 8 bits under precision auto, its fp32 twin."""
        if np.dtype(dtype) == np.uint8 or (self._fp32_model is None and self._fp32_twin is None):
            return self
        if self._fp32_twin is None:
            self._fp32_twin = Restorer(self._fp32_model, device=self.device, precision="fp32", **self._options)
            self._fp32_model = None  # the twin owns it now
        return self._fp32_twin

    @torch.inference_mode()
    def _restore_native(self, array: np.ndarray, progress: Progress | None) -> np.ndarray:
        color, alpha = split_alpha(array)
        height, width = color.shape[:2]
        if not height or not width:
            raise ValueError(f"an empty image ({height}x{width} pixels) has nothing to restore")
        if np.issubdtype(color.dtype, np.floating) and not np.isfinite(color).all():
            raise ValueError("the image has NaN or infinite pixels, which would spread through the whole result")

        def cut(top: int, left: int, tile_height: int, tile_width: int) -> Tensor:
            # Tiles are converted to float one at a time: no float copy of the whole image.
            return array_to_tensor(color[top:top + tile_height, left:left + tile_width])

        shape = self.tile_shape_for(height, width)
        whole = self._try_forward(cut(0, 0, height, width)) if shape is None else None
        if whole is not None:
            return join_alpha(tensor_to_array(whole, like=color), alpha)
        if shape is None:  # the whole image ran out of memory
            if self.tile is not None:  # the user asked for the whole image: say so, do not tile
                raise DeviceError("out of memory on the device running the whole image; "
                                  "use --tile auto or a tile size such as --tile 512")
            shape = _halve((round_up(height), round_up(width)), "the whole image")
        restored = self._restore_tiles(cut, height, width, shape, self.tile_overlap, progress)
        return join_alpha(tensor_to_array(restored, like=color), alpha)

    def tile_shape_for(self, height: int, width: int) -> tuple[int, int] | None:
        """The (height, width) of the tiles this image runs in, or None for the whole image.

        With `tile=None`: the whole image when it fits the memory budget (and, on the CPU,
        the latency cap), else the fewest tiles that do, sized to waste little on overlap.
        """
        if (height, width) in self._held_shapes:
            return self._held_shapes[(height, width)]
        if self.tile is not None:
            return (self.tile, self.tile) if self.tile else None
        pixels = self._pixels_that_fit()
        if self.device.type == "cpu":
            pixels = min(pixels, CPU_TILE_CAP**2)
        return plan_tile_shape(height, width, pixels, self.tile_overlap)

    @contextlib.contextmanager
    def same_tiles(self, height: int, width: int,
                   shape: tuple[int, int] | None | str = "choose") -> Iterator[tuple[int, int] | None]:
        """Restore every image of this size in the block with one tile shape, chosen now
        (or `shape`, one chosen earlier: a resumed clip keeps the grid it started with).

        Auto tiling reads the free memory, which moves as a process runs; a sequence of
        frames cut by one grid keeps its seams still, where a grid that changed between
        frames would make them flicker. Yields the shape (None: whole images).
        """
        held = self.tile_shape_for(height, width) if isinstance(shape, str) else shape
        self._held_shapes[(height, width)] = held
        try:
            yield held
        finally:
            del self._held_shapes[(height, width)]

    def tiles_per_batch(self, shape: tuple[int, int]) -> int:
        """On a GPU one small tile leaves most of the device idle: batch as many as fit."""
        if self.tile_batch is not None:
            return self.tile_batch
        if self.device.type == "cpu":
            return 1
        fits = int(self._pixels_that_fit() / (shape[0] * shape[1]))
        return max(1, min(MAX_TILE_BATCH, fits))

    def frames_per_forward(self, height: int, width: int) -> int:
        """How many whole frames of this size one forward takes: several on a GPU when
        they run untiled and memory allows (as tiles are batched), else one."""
        if self.tile_shape_for(height, width) is not None:
            return 1
        return self.tiles_per_batch((round_up(height), round_up(width)))

    def restore_frames(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        """Frames of one size and dtype (HxWx3) in one forward, as `restore_array` restores
        each (deep frames under precision auto on the fp32 twin) up to float rounding, since
        a batch may sum in another order; tiled frames go one at a time, and a batch the
        device has no room for is split."""
        restorer = self.restorer_for(frames[0].dtype)
        if restorer is not self:
            return restorer.restore_frames(frames)
        if len(frames) == 1 or self.tile_shape_for(*frames[0].shape[:2]) is not None:
            return [self.restore_array(frame) for frame in frames]
        with torch.inference_mode():
            restored = self._try_forward(torch.cat([array_to_tensor(frame) for frame in frames]))
            if restored is not None:
                return [tensor_to_array(restored[index:index + 1], like=frame) for index, frame in enumerate(frames)]
        half = len(frames) // 2
        logger.debug("out of memory with %d frames per forward; retrying with %d", len(frames), half)
        return self.restore_frames(frames[:half]) + self.restore_frames(frames[half:])

    def _pixels_that_fit(self) -> float:
        """Input pixels that one forward may take now, by the memory budget."""
        return memory_budget(self.device) / self.bytes_per_pixel()

    def bytes_per_pixel(self) -> float:
        """Peak device memory per input pixel of one forward: measured with a probe on CUDA,
        estimated from the network's widths elsewhere."""
        if self._bytes_per_pixel is None:
            if self.device.type == "cuda":
                self._bytes_per_pixel = self._measure_cuda_bytes_per_pixel()
            else:
                self._bytes_per_pixel = estimate_bytes_per_pixel(self.model.config, self.dtype,
                                                                 tlc=self.tlc_train_size is not None)
        return self._bytes_per_pixel

    def _measure_cuda_bytes_per_pixel(self) -> float:
        """Measured on a second forward: on the first of each shape cuDNN tries its kernels
        with whatever workspace they ask for, and keeps only the one it picks (a deblur
        forward at 512x512 in fp32 on an H100 peaked at 19.9 GB the first time, 1.1 GB the
        second). With TLC, the probe runs with windows for 8-pixel crops: at 256 pixels the
        train size's windows would cover the maps, and these keep nearly all of every map,
        TLC's most memory."""
        side = 256
        probe = torch.zeros(1, 3, side, side, device=self.device, dtype=self.dtype)
        probe = probe.contiguous(memory_format=torch.channels_last)
        attention = self.model.local_attention(SIZE_MULTIPLE if self.tlc_train_size is not None else None)
        with torch.inference_mode(), self.cudnn_settings(), attention:  # eager: a graph would keep the memory
            self.model(probe)
            _release_cached_memory(self.device)  # the trials' memory, which free memory would count as used
            torch.cuda.synchronize(self.device)
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.model(probe)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        return PROBE_SAFETY * peak / (side * side)

    def _graph_fits(self, batch: Tensor) -> bool:
        return batch.shape[0] * batch.shape[-2] * batch.shape[-1] <= GRAPH_MEMORY_SHARE * self._pixels_that_fit()

    def _restore_tiles(self, cut: TileCutter, height: int, width: int, shape: tuple[int, int], overlap: int,
                       progress: Progress | None) -> Tensor:
        """Run the tiles in batches and stitch them into a float accumulator on the host.

        A batch that runs out of memory is split; a single tile that does is itself restored
        as smaller tiles (down to `MIN_TILE`), so one oversized tile never fails the image.
        """
        overlap = min(overlap, max_overlap(min(shape), self.tile_blend))
        grid = TileGrid(height, width, shape, overlap, self.tile_blend)
        output = torch.zeros(3, height, width)
        batch = self.tiles_per_batch(shape)
        tiles = list(grid)
        done = 0
        if progress is not None:
            progress(done, len(tiles))
        while done < len(tiles):
            group = tiles[done:done + batch]
            restored = self._try_forward(torch.cat([cut(t.top, t.left, t.height, t.width) for t in group]))
            if restored is None:
                if len(group) > 1:
                    batch = len(group) // 2
                    logger.warning("out of memory with %d tiles per batch; retrying with %d", len(group), batch)
                    continue
                smaller = _halve((grid.tile_height, grid.tile_width), f"{grid.tile_width}x{grid.tile_height} tiles")
                restored = self._restore_smaller(cut, group[0], smaller)
            for placed, pixels in zip(group, restored):
                grid.accumulate(output, placed, pixels)
            done += len(group)
            if progress is not None:
                progress(done, len(tiles))
        return output[None]

    def _try_forward(self, batch: Tensor) -> Tensor | None:
        """The restored batch, or None when the device ran out of memory.

        Retrying must wait until this returns: until the except clause ends, the error's
        traceback holds the failed forward's frames and with them every tensor it had made.
        Retried inside it, each smaller attempt ran beside all the failed ones (seen on an
        H100: 256x192 tiles failed where two 256x256 tiles had room).
        """
        try:
            return self.restore_tensor(batch)
        except RuntimeError as error:
            if not is_out_of_memory(error):
                raise
            # The allocator's own account (MPRNET_DEBUG=1 shows it), as text: a record that
            # held the error would hold its traceback too.
            logger.debug("%s", str(error))
        if self._graphs is not None:  # the device is short of memory: none for graphs to keep
            logger.debug("CUDA graphs off after running out of memory")
            self._graphs = None
        _release_cached_memory(self.device)
        return None

    def _restore_smaller(self, cut: TileCutter, tile: Tile, smaller: tuple[int, int]) -> Tensor:
        logger.warning("out of memory on a %dx%d tile; retrying it as %dx%d tiles", tile.width, tile.height,
                       smaller[1], smaller[0])

        def cut_inside(top: int, left: int, tile_height: int, tile_width: int) -> Tensor:
            return cut(tile.top + top, tile.left + left, tile_height, tile_width)

        return self._restore_tiles(cut_inside, tile.height, tile.width, smaller, self.tile_overlap, None)

    def _restore_pil(self, image: Image.Image, progress: Progress | None) -> Image.Image:
        """As the command line reads a file: the same modes kept, converted or refused."""
        from PIL import Image

        from mprnet_cli.pixels import pil_pixels

        return Image.fromarray(self.restore_array(pil_pixels(image), progress))


def _transform(image: Tensor, flip: bool, turns: int) -> Tensor:
    """Flip left-right, then turn by `turns` quarter turns."""
    if flip:
        image = image.flip(-1)
    return image.rot90(turns, dims=(-2, -1)) if turns else image


def _untransform(image: Tensor, flip: bool, turns: int) -> Tensor:
    if turns:
        image = image.rot90(-turns, dims=(-2, -1))
    return image.flip(-1) if flip else image


def _release_freed_memory_before_stage3(model: MPRNet) -> None:
    """On the first forward of each input shape, hand the heap's freed pages back to the OS
    just before stage 3 (see `release_freed_host_memory`). A deblur forward at 512x512 in
    bf16 then peaked at 3.3 to 4.6 GB RSS per megapixel (11 fresh processes), against 4.0
    to 5.7 without (13), in the same time (14.36 against 14.29 s over 4 interleaved pairs);
    done before every forward instead, it cost 150,000 to 210,000 page faults and 0.3 to
    0.4 s each. One hook per model, however many Restorers share it."""
    if getattr(model, "_releases_freed_memory", False):
        return
    shapes_seen: set[torch.Size] = set()

    def before_stage3(_module: torch.nn.Module, inputs: tuple[Tensor, ...]) -> None:
        if inputs[0].shape not in shapes_seen:
            shapes_seen.add(inputs[0].shape)
            release_freed_host_memory()

    model.stage3_orsnet.register_forward_pre_hook(before_stage3)
    model._releases_freed_memory = True


def _halve(shape: tuple[int, int], what: str) -> tuple[int, int]:
    """Half of each side, as a multiple of 8 and no less than `MIN_TILE`; an error when
    neither side can shrink any more."""
    smaller = tuple(max(MIN_TILE, side // 2 // SIZE_MULTIPLE * SIZE_MULTIPLE) for side in shape)
    if smaller == tuple(shape):
        raise DeviceError(f"out of memory on the device running {what} (smallest tile is {MIN_TILE} pixels); "
                          "free device memory, use --precision bf16, or --device cpu")
    return smaller  # type: ignore[return-value]


def _release_cached_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def split_alpha(array: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Separate colour (HxW or HxWx3) from alpha; alpha is not restored, only carried."""
    channels = 1 if array.ndim == 2 else array.shape[2] if array.ndim == 3 else 0
    if channels == 1:
        return array.reshape(array.shape[:2]), None
    if channels == 2:
        return array[..., 0], array[..., 1]
    if channels == 3:
        return array, None
    if channels == 4:
        return array[..., :3], array[..., 3]
    raise ValueError(f"expected an HxW, HxWx1, HxWx2, HxWx3 or HxWx4 image, got shape {array.shape}")


def join_alpha(color: np.ndarray, alpha: np.ndarray | None) -> np.ndarray:
    if alpha is None:
        return color
    if color.ndim == 2:
        return np.stack([color, alpha], axis=-1)
    return np.concatenate([color, alpha[..., None]], axis=-1)


def array_to_tensor(color: np.ndarray) -> Tensor:
    """HxW (gray, repeated to RGB) or HxWx3 pixels to a 1x3xHxW float tensor in [0, 1]."""
    scale = _INTEGER_SCALE.get(color.dtype)
    if scale is None and not np.issubdtype(color.dtype, np.floating):
        raise ValueError(f"expected uint8, uint16 or float pixels, got {color.dtype}")
    tensor = torch.from_numpy(np.array(color, dtype=np.float32))  # a writable float copy
    if scale is not None:
        tensor /= scale
    tensor = tensor[None, None].expand(1, 3, *color.shape) if color.ndim == 2 else tensor.permute(2, 0, 1)[None]
    return tensor.contiguous()


def tensor_to_array(tensor: Tensor, like: np.ndarray) -> np.ndarray:
    """Inverse of `array_to_tensor`: same dtype and layout as `like` (gray is the channel mean).

    Works in place on `tensor` (which may be image-sized), so no second float copy is made.
    """
    pixels = tensor[0].mean(dim=0) if like.ndim == 2 else tensor[0].permute(1, 2, 0)
    scale = _INTEGER_SCALE.get(like.dtype)
    if scale is None:
        return pixels.numpy().astype(like.dtype, copy=False)
    return pixels.mul_(scale).round_().numpy().astype(like.dtype)
