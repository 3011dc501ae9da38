"""MPRNet (Zamir et al., CVPR 2021) written from the paper's description.

Attribute names follow the published checkpoints' state-dict keys, so the authors'
files load unchanged; everything else is ours. The first stage sees the image as four
patches and the second as two. Rather than looping over patches, each stage stacks its
patches along the batch axis and runs once: channel attention pools per sample, so this
is the same arithmetic as the per-patch formulation, in fewer and larger calls.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mprnet_cli.devices import cpu_has_native_bf16
from mprnet_cli.model import kernels
from mprnet_cli.model.config import MPRNetConfig

#: Input height and width must be a multiple of this: two halvings inside the U-Nets,
#: applied to patches that are themselves half the image.
SIZE_MULTIPLE = 8


def _conv(in_channels: int, out_channels: int, kernel_size: int, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)


def _eager_inference() -> bool:
    """True where the hand fusions below apply: eager inference. While `torch.compile`
    traces, the plain ops are left to it (it fuses them itself, and these calls would
    split its graph into dozens)."""
    return not torch.compiler.is_compiling() and torch.is_inference_mode_enabled()


def _grow(x: Tensor, *terms: Tensor) -> Tensor:
    """`x + sum(terms)`, written into `x` under `torch.inference_mode`, where no autograd
    graph can ever need it: one large temporary fewer per call, which lowers the forward's
    peak memory. `x` must be a fresh result that only the caller holds."""
    if not _eager_inference():
        return sum(terms, x)
    for term in terms:
        x.add_(term)
    return x


def _gate_and_add(x: Tensor, gate: Tensor, residual: Tensor) -> Tensor:
    """`x * gate + residual`, with a gate smaller than `x` edge-replicated out to its size
    (TLC's border rule, `replicate_to`; a per-channel gate is its one value everywhere).
    Under the rule of `_grow`, in one pass over `x`, written into `x`, and the replicated
    gate is never made at full size: the rows above and below the gate's own take its first
    and last row, broadcast (on a 512x512 map, TLC's gate covers 129x129 of it)."""
    height, width = x.shape[-2:]
    gate_height, gate_width = gate.shape[-2:]
    if not _eager_inference():
        per_channel = (gate_height, gate_width) == (1, 1)
        return torch.addcmul(residual, x, gate if per_channel else replicate_to(gate, height, width))
    if gate_width > 1:
        gate = replicate_to(gate, gate_height, width)
    elif x.device.type == "cpu" and gate.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last):
        # ATen's CPU kernels vectorise the innermost run that all operands share. For a
        # per-channel gate that is one pixel's channels (56 for derain), too short for
        # 32-wide bf16 vectors; a gate row as wide as the image makes it a whole image row:
        # 2.9x faster there.
        gate = gate.expand(*gate.shape[:3], width).contiguous(memory_format=torch.channels_last)
    if gate_height in (1, height):
        return torch.addcmul(residual, x, gate, out=x)
    above = (height - gate_height) // 2
    below = height - above - gate_height
    for start, rows, band in ((0, above, gate.narrow(-2, 0, 1)), (above, gate_height, gate),
                              (above + gate_height, below, gate.narrow(-2, gate_height - 1, 1))):
        if rows:
            torch.addcmul(residual.narrow(-2, start, rows), x.narrow(-2, start, rows), band,
                          out=x.narrow(-2, start, rows))
    return x


def _conv_prelu(conv: nn.Conv2d, activation: nn.PReLU, x: Tensor) -> Tensor:
    """`activation(conv(x))`, fused on the CPU (`_convolve`)."""
    return _convolve(x, conv.weight, conv.bias, conv.padding[0], activation)


def _convolve(x: Tensor, weight: Tensor, bias: Tensor | None, padding: int,
              activation: nn.PReLU | None = None) -> Tensor:
    """A stride-1 convolution, then `activation` if given.

    The published PReLU has one slope, which makes it a leaky ReLU: oneDNN applies that to
    the convolution's accumulators as they are stored (a post-op), which saves a pass over
    the output; the separate PReLU was 5% of a deblur forward. Only for inference on CPU
    tensors that oneDNN computes natively; the result matches the unfused one to rounding.
    """
    if activation is None:
        return F.conv2d(x, weight, bias, padding=padding)
    if not (_eager_inference() and activation.weight.numel() == 1 and _onednn_computes(x)):
        return activation(F.conv2d(x, weight, bias, padding=padding))
    return torch.ops.mkldnn._convolution_pointwise(
        x, weight, bias, [padding, padding], [1, 1], [1, 1], 1, "leaky_relu", [activation.weight.item()], "")


def _composes(x: Tensor) -> bool:
    """True where `_two_convolutions` runs two convolutions as one: eager inference on the
    CPU, where it was measured (not on GPUs, where it would add a dozen small launches)."""
    return _eager_inference() and x.device.type == "cpu"


def _two_convolutions(first: nn.Conv2d, second: nn.Conv2d, x: Tensor, activation: nn.PReLU | None = None) -> Tensor:
    """`activation(second(first(x)))` for two stride-1 "same" convolutions of one odd size, as one.

    Two convolutions with nothing between them are one convolution whose kernel is theirs
    convolved (5x5 from two 3x3). Where one side is the image's 3 channels that takes far
    fewer multiply-adds: the shallow features' first 96-channel convolution becomes a 5x5
    one on the image (7,200 instead of 82,944 per pixel for deblur), and stage 3's closing
    convolution folds into the tail. The composed kernel is exact except on the outer ring
    of pixels, where the second convolution zero-pads the first one's output but the
    composed kernel sees the first applied to the image's zero padding; that ring is taken
    the two-step way from strips of the input. Sides under three times the padding are
    left to the two-step way entirely.
    """
    pad = first.padding[0]
    if min(x.shape[-2:]) < 3 * pad:
        return _convolve(first(x), second.weight, second.bias, pad, activation)
    weight, bias = _composed_kernel(first, second)
    out = _convolve(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), 2 * pad, activation)

    def two_step(strip: Tensor) -> Tensor:
        return _convolve(first(strip), second.weight, second.bias, pad, activation)

    strip = 3 * pad
    if pad:  # 1x1 kernels pad nothing: no ring
        out[..., :pad, :] = two_step(x[..., :strip, :])[..., :pad, :]
        out[..., -pad:, :] = two_step(x[..., -strip:, :])[..., -pad:, :]
        out[..., :, :pad] = two_step(x[..., :, :strip])[..., :, :pad]
        out[..., :, -pad:] = two_step(x[..., :, -strip:])[..., :, -pad:]
    return out


def _composed_kernel(first: nn.Conv2d, second: nn.Conv2d) -> tuple[Tensor, Tensor | None]:
    """Weight and bias of `second` after `first` as one convolution, taken exactly
    (`_exact`): the kernels convolved, and `first`'s bias carried through `second`'s
    weights."""
    inner, outer = _exact(first.weight), _exact(second.weight)
    weight = F.conv_transpose2d(inner.transpose(0, 1), outer.transpose(0, 1)).transpose(0, 1)
    bias = None if second.bias is None else _exact(second.bias)
    if first.bias is not None:
        carried = outer.sum(dim=(2, 3)) @ _exact(first.bias)
        bias = carried if bias is None else bias + carried
    return weight, bias


def _exact(weight: Tensor) -> Tensor:
    """`weight` in float64 for products of weights, which CUDA never runs in TF32, whatever
    the caller allowed for fp32 matrix products (on an H100, `torch.backends.fp32_precision
    = "tf32"` moved the fp32 parity fixture by 7e-5); in float32 on Apple's MPS, which has
    no float64 and no TF32."""
    return weight.to(torch.float32 if weight.device.type == "mps" else torch.float64)


def _onednn_computes(x: Tensor) -> bool:
    """True where oneDNN's fused convolution can take `x`: a CPU tensor in fp32, or in bf16
    on a CPU with bf16 instructions (elsewhere the fused op refuses bf16 outright)."""
    if x.device.type != "cpu" or not torch.backends.mkldnn.is_available() or not torch.backends.mkldnn.enabled:
        return False
    if x.dtype == torch.bfloat16:
        return cpu_has_native_bf16()
    return x.dtype == torch.float32


def _split(x: Tensor, dim: int) -> Tensor:
    """Cut `x` in two along `dim` and stack the halves on the batch axis (first half first)."""
    return torch.cat(x.chunk(2, dim=dim), dim=0)


def _join(x: Tensor, dim: int) -> Tensor:
    """Undo `_split`: take the two batch halves and put them side by side along `dim`."""
    return torch.cat(x.chunk(2, dim=0), dim=dim)


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation: a gate per channel, computed from the channel means.

    With a `window` (the test-time local converter, `MPRNet.local_attention`), the means
    are taken over that window around each pixel instead of over the whole map, and the
    gate varies across the image; a window that covers the map is the global mean, taken
    the global way, so its output is unchanged to the bit.
    """

    def __init__(self, channels: int, reduction: int, bias: bool) -> None:
        super().__init__()
        self.conv_du = nn.Sequential(
            nn.Conv2d(channels, channels // reduction, 1, bias=bias),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels // reduction, channels, 1, bias=bias),
            nn.Sigmoid(),
        )
        self.window: tuple[int, int] | None = None

    def forward(self, x: Tensor) -> Tensor:
        """The gate for `x`: BxCx1x1, or with a local window, one value per window that lies
        inside the map, whose edges stand for the rest (TLC's border rule). `_gate_and_add`
        applies either, with the caller's residual sum; `replicate_to` gives the full map."""
        if not self._is_local(x):
            return self.conv_du(_spatial_mean(x))
        # The gate's first 1x1 convolution is linear, so it commutes with the mean: taken
        # per pixel first, it leaves `reduction` times fewer channels to average (derain's
        # stage 3 at 512x512 in bf16: 7.2 against 9.4 ms an attention). The rest acts per
        # pixel too, so it runs on the windows that lie inside the map, and the gate is
        # replicated only where it is applied.
        return self._local_gate(local_mean(self.conv_du[0](x), self.window))

    def gate_and_add(self, x: Tensor, residual: Tensor) -> Tensor:
        """`x * self(x) + residual`, under the rule of `_grow`. With a local window, for CPU
        inference where the compiled kernel takes the maps (`kernels.applies`), in one pass
        that never writes the gate out: the means, the gate and its apply, a row at a time."""
        if self._is_local(x) and _eager_inference() and kernels.applies(x, residual):
            reduced = self.conv_du[0](x).contiguous(memory_format=torch.channels_last)
            return kernels.local_gate_and_add(x, residual, reduced, self.conv_du[2], self.window)
        return _gate_and_add(x, self(x), residual)

    def _is_local(self, x: Tensor) -> bool:
        """True where the window leaves out part of `x`'s map; one that covers it is the
        global mean, taken the global way."""
        return self.window is not None and (self.window[0] < x.shape[-2] or self.window[1] < x.shape[-1])

    def _local_gate(self, means: Tensor) -> Tensor:
        """The gate from the local means of `x` after `conv_du`'s first convolution. Where
        oneDNN computes it in inference, the last 1x1 convolution takes the sigmoid as a
        post-op, which saves a pass over the map of windows."""
        _, activation, up, gate = self.conv_du
        if not (_eager_inference() and _onednn_computes(means)):
            return gate(up(activation(means)))
        return torch.ops.mkldnn._convolution_pointwise(
            means.relu_(), up.weight, up.bias, [0, 0], [1, 1], [1, 1], 1, "sigmoid", [], "")


def local_mean(x: Tensor, window: tuple[int, int]) -> Tensor:
    """The mean of each window of `x` (BxCxHxW) that lies wholly inside the map, stride 1:
    B x C x (H - h + 1) x (W - w + 1) for the window (h, w), each side clamped to the map's.

    Box sums one axis at a time (`_box_sums`), so the cost does not grow with the window,
    accumulated in fp32 (fp64 for fp64 input). Down the columns first: in channels-last
    memory each row of the map is one contiguous block, so the pass over the whole map runs
    over long runs, and the pass along the rows over the map it left (on a 512x512 map with
    windows of 384, a quarter of it). The result has `x`'s dtype, as the global mean has.
    """
    height, width = x.shape[-2:]
    window_height, window_width = min(window[0], height), min(window[1], width)
    accumulate = torch.float64 if x.dtype == torch.float64 else torch.float32
    columns = _box_sums(x, window_height, dim=2, dtype=accumulate)
    boxes = _box_sums(columns, window_width, dim=3, dtype=accumulate)
    scale = 1.0 / (window_height * window_width)
    # In place where no autograd graph can need `boxes` (a cast through mul's out= was 15x slower).
    return (boxes.mul_(scale) if _eager_inference() else boxes * scale).to(x.dtype)


def _box_sums(x: Tensor, length: int, dim: int, dtype: torch.dtype) -> Tensor:
    """Sums, in `dtype`, of `length` consecutive slices of `x` along `dim`, for every start
    that fits.

    For CPU inference, each sum is the one before plus the slice that enters the window
    minus the one that leaves it: the first sum, the differences (exact in fp32 for bf16
    values), and their running sums (`_add_up_slices`, `_running_sums_`), each a few dozen
    whole-tensor operations. Adding slice by slice took an operation per row and column (on
    a 512x512 map, 0.6 of the 0.7 s TLC's means took in a derain forward), and ATen's CPU
    `cumsum` walks each line value by value (5x slower across a channels-last map's rows).
    On GPUs and under autograd, `cumsum`, differenced.
    """
    size = x.shape[dim]
    count = size - length + 1
    if not (x.device.type == "cpu" and _eager_inference()):
        running = x.to(dtype).cumsum(dim)
        later = running.narrow(dim, length, size - length) - running.narrow(dim, 0, size - length)
        return torch.cat([running.narrow(dim, length - 1, 1), later], dim=dim)
    sums = _empty_in_layout_of(x, x.shape[:dim] + (count,) + x.shape[dim + 1:], dtype)
    _add_up_slices(x.narrow(dim, 0, length), dim, out=sums.narrow(dim, 0, 1))
    entering, leaving = x.narrow(dim, length, count - 1), x.narrow(dim, 0, count - 1)
    steps = sums.narrow(dim, 1, count - 1)
    if x.dtype == dtype:
        torch.sub(entering, leaving, out=steps)
    else:  # a bf16 difference cast to fp32 would be rounded: the slices are cast first
        steps.copy_(entering).sub_(leaving)
    _running_sums_(sums, dim)  # the first sum, then each difference added on
    return sums


#: The most memory `_add_up_slices` adds into, about a core's share of the cache nearest it.
ACCUMULATOR_BYTES = 1 << 20


def _add_up_slices(x: Tensor, dim: int, out: Tensor) -> None:
    """Write the sum of `x`'s slices along `dim` into `out` (one slice thick, its dtype the
    accumulator's): runs of about sqrt(n) slices added onto the first run, whole runs at a
    time, then the run's halves folded onto each other; about sqrt(n) + log2(n) operations
    where one a slice took n. The run is at most `ACCUMULATOR_BYTES`, so that it stays in
    cache while every run is added onto it (384 rows of a 512x512 map of 56 channels in
    bf16: 2.8 ms in runs of 20 rows, 2.3 MB, and 2.5 ms in runs of 8; of 128 channels, 5.7
    and 4.5 ms)."""
    count = x.shape[dim]
    run = max(1, min(_ceil_sqrt(count), ACCUMULATOR_BYTES // (out.numel() * out.element_size())))
    total = _empty_in_layout_of(x, x.shape[:dim] + (run,) + x.shape[dim + 1:], out.dtype)
    total.copy_(x.narrow(dim, 0, run))
    whole_runs = count // run
    for start in range(run, whole_runs * run, run):
        total.add_(x.narrow(dim, start, run))
    left_over = count - whole_runs * run
    if left_over:
        total.narrow(dim, 0, left_over).add_(x.narrow(dim, whole_runs * run, left_over))
    while run > 1:  # the last `half` slices onto the first; with an odd run, the middle one waits
        half = run // 2
        total.narrow(dim, 0, half).add_(total.narrow(dim, run - half, half))
        run -= half
    out.copy_(total.narrow(dim, 0, 1))


def _running_sums_(x: Tensor, dim: int) -> None:
    """`x.cumsum_(dim)` for CPU inference, in blocks of about sqrt(n) slices: running sums
    inside every block at once, then the blocks' totals carried from block to block, then
    each block's carry added to the rest of it; about 2 sqrt(n) operations on whole blocks
    where one a slice took n (the block size near sqrt(n) that takes fewest, counting the
    slices left over after the last whole block, which go one at a time)."""
    count = x.shape[dim]
    if count < 2:
        return
    block = _block_size(count)
    blocks = count // block
    grid = x.narrow(dim, 0, blocks * block).unflatten(dim, (blocks, block))  # dim: the block, dim + 1: inside it
    for index in range(1, block):
        grid.select(dim + 1, index).add_(grid.select(dim + 1, index - 1))
    totals = grid.select(dim + 1, block - 1)
    for index in range(1, blocks):
        totals.select(dim, index).add_(totals.select(dim, index - 1))
    if blocks > 1:
        grid.narrow(dim, 1, blocks - 1).narrow(dim + 1, 0, block - 1).add_(
            totals.narrow(dim, 0, blocks - 1).unsqueeze(dim + 1))
    for index in range(blocks * block, count):  # fewer than `block` left over
        x.select(dim, index).add_(x.select(dim, index - 1))


@functools.cache
def _block_size(count: int) -> int:
    """The block size for `_running_sums_` that takes fewest operations, give or take two."""
    return min(range(1, 2 * _ceil_sqrt(count) + 1), key=lambda size: size + count // size + count % size)


def _ceil_sqrt(count: int) -> int:
    return math.isqrt(count - 1) + 1 if count > 1 else 1


def _empty_in_layout_of(x: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A tensor of `shape` and `dtype` on `x`'s device in `x`'s memory format, read off the
    strides, which a narrowed view keeps (channels-last: the channels' stride is the least):
    `empty_like` of a narrowed channels-last view gives the default layout, and every pass
    between the two layouts then transposes."""
    channels_last = x.stride(1) < min(x.stride(2), x.stride(3))
    return torch.empty(shape, dtype=dtype, device=x.device,
                       memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def replicate_to(x: Tensor, height: int, width: int) -> Tensor:
    """Edge-replicate `x` out to height x width: half the missing rows (rounded down) before,
    the rest after, and likewise for columns (the border rule of Chu et al.)."""
    missing_height, missing_width = height - x.shape[-2], width - x.shape[-1]
    if not missing_height and not missing_width:
        return x
    padding = (missing_width // 2, missing_width - missing_width // 2, missing_height // 2,
               missing_height - missing_height // 2)
    return F.pad(x, padding, mode="replicate")


def _spatial_mean(x: Tensor) -> Tensor:
    """The mean of each channel over the image (BxCx1x1).

    In bf16 the CPU's reduction kernel first copies the whole tensor to fp32 and was 14% of
    a forward; a matrix product with ones (fp32 accumulation inside) is about 15x faster
    and as exact (the sum is rounded to bf16 once, as the mean would be).
    """
    if x.dtype != torch.bfloat16:
        return x.mean(dim=(2, 3), keepdim=True)
    batch, channels, height, width = x.shape
    pixels = x.permute(0, 2, 3, 1).reshape(batch, height * width, channels)  # a view when channels-last
    total = torch.bmm(x.new_ones(batch, 1, height * width), pixels)
    return (total.float() / (height * width)).to(x.dtype).reshape(batch, channels, 1, 1)


class ChannelAttentionBlock(nn.Module):
    """conv -> PReLU -> conv -> channel attention, plus the input (the paper's CAB)."""

    def __init__(self, channels: int, config: MPRNetConfig) -> None:
        super().__init__()
        # The published model shares one PReLU between all blocks; the checkpoints still
        # store it under every block's key, so a PReLU per block loads the same values.
        self.CA = ChannelAttention(channels, config.reduction, config.bias)
        self.body = nn.Sequential(
            _conv(channels, channels, config.kernel_size, config.bias),
            nn.PReLU(),
            _conv(channels, channels, config.kernel_size, config.bias),
        )

    def forward(self, x: Tensor) -> Tensor:
        first, activation, _ = self.body
        return self.finish(x, _conv_prelu(first, activation, x))

    def finish(self, x: Tensor, hidden: Tensor) -> Tensor:
        """The block's output from `hidden`, its first convolution and PReLU already applied."""
        features = self.body[2](hidden)
        return self.CA.gate_and_add(features, x)


def _blocks(count: int, channels: int, config: MPRNetConfig) -> nn.Sequential:
    return nn.Sequential(*(ChannelAttentionBlock(channels, config) for _ in range(count)))


def _resample(scale: float, in_channels: int, out_channels: int) -> nn.Sequential:
    """Bilinear rescale followed by a 1x1 convolution that changes the width."""
    return nn.Sequential(
        nn.Upsample(scale_factor=scale, mode="bilinear", align_corners=False),
        nn.Conv2d(in_channels, out_channels, 1, bias=False),
    )


class DownSample(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.down = _resample(0.5, in_channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(x)


class UpSample(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = _resample(2.0, in_channels, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        # Convolution first: a 1x1 convolution mixes channels per pixel and bilinear
        # upsampling mixes pixels per channel, so they commute, and the convolution then
        # runs on a quarter of the pixels and the upsampling on the narrower output.
        upsample, conv = self.up
        return upsample(conv(x))


class Encoder(nn.Module):
    """Three-level U-Net encoder; with `fuse_previous`, it adds the earlier stage's features
    (the paper's cross-stage feature fusion) at every level."""

    def __init__(self, config: MPRNetConfig, fuse_previous: bool) -> None:
        super().__init__()
        widths = config.unet_widths
        self.encoder_level1 = _blocks(2, widths[0], config)
        self.encoder_level2 = _blocks(2, widths[1], config)
        self.encoder_level3 = _blocks(2, widths[2], config)
        self.down12 = DownSample(widths[0], widths[1])
        self.down23 = DownSample(widths[1], widths[2])
        self.fuse_previous = fuse_previous
        if fuse_previous:
            for level, width in enumerate(widths, start=1):
                setattr(self, f"csff_enc{level}", nn.Conv2d(width, width, 1, bias=config.bias))
            for level, width in enumerate(widths, start=1):
                setattr(self, f"csff_dec{level}", nn.Conv2d(width, width, 1, bias=config.bias))

    def _fuse(self, level: int, x: Tensor, encoded: list[Tensor] | None, decoded: list[Tensor] | None) -> Tensor:
        if encoded is None or decoded is None:
            return x
        enc_conv = getattr(self, f"csff_enc{level}")
        dec_conv = getattr(self, f"csff_dec{level}")
        return _grow(x, enc_conv(encoded[level - 1]), dec_conv(decoded[level - 1]))

    def forward(
        self, x: Tensor, encoded: list[Tensor] | None = None, decoded: list[Tensor] | None = None
    ) -> list[Tensor]:
        level1 = self._fuse(1, self.encoder_level1(x), encoded, decoded)
        level2 = self._fuse(2, self.encoder_level2(self.down12(level1)), encoded, decoded)
        level3 = self._fuse(3, self.encoder_level3(self.down23(level2)), encoded, decoded)
        return [level1, level2, level3]


class SkipUpSample(UpSample):
    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return _grow(super().forward(x), skip)


class Decoder(nn.Module):
    """Three-level U-Net decoder with attention blocks on the skip connections."""

    def __init__(self, config: MPRNetConfig) -> None:
        super().__init__()
        widths = config.unet_widths
        self.decoder_level1 = _blocks(2, widths[0], config)
        self.decoder_level2 = _blocks(2, widths[1], config)
        self.decoder_level3 = _blocks(2, widths[2], config)
        self.skip_attn1 = ChannelAttentionBlock(widths[0], config)
        self.skip_attn2 = ChannelAttentionBlock(widths[1], config)
        self.up21 = SkipUpSample(widths[1], widths[0])
        self.up32 = SkipUpSample(widths[2], widths[1])

    def forward(self, encoded: list[Tensor]) -> list[Tensor]:
        level3 = self.decoder_level3(encoded[2])
        level2 = self.decoder_level2(self.up32(level3, self.skip_attn2(encoded[1])))
        level1 = self.decoder_level1(self.up21(level2, self.skip_attn1(encoded[0])))
        return [level1, level2, level3]


class SupervisedAttention(nn.Module):
    """Predicts the stage's image and uses it to gate the features passed on (the paper's SAM)."""

    def __init__(self, config: MPRNetConfig) -> None:
        super().__init__()
        width, bias = config.n_feat, config.bias
        self.conv1 = _conv(width, width, 1, bias)
        self.conv2 = _conv(width, config.out_c, 1, bias)
        self.conv3 = _conv(config.out_c, width, 1, bias)

    def forward(self, features: Tensor, degraded: Tensor) -> tuple[Tensor, Tensor]:
        image = _grow(self.conv2(features), degraded)
        return _gate_and_add(self.conv1(features), torch.sigmoid(self.conv3(image)), features), image


class OriginalResolutionBlock(nn.Module):
    """A run of attention blocks and a convolution, with a residual connection (ORB)."""

    def __init__(self, width: int, config: MPRNetConfig) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *(ChannelAttentionBlock(width, config) for _ in range(config.num_cab)),
            _conv(width, width, config.kernel_size, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return _grow(self.body(x), x)

    def then(self, tail: nn.Conv2d, x: Tensor, skip: Tensor) -> Tensor:
        """`tail(self(x) + skip)`, consuming `x` and `skip`. Where `_composes`, the closing
        convolution and `tail` run as one (`_two_convolutions`); the residual and skip then
        go through `tail` on their own, as `tail` is linear."""
        if not _composes(x):
            return tail(_grow(self(x), skip))
        *_, closing = self.body
        features = self.body[:-1](x)  # `x` itself when the block has no attention blocks
        restored = _two_convolutions(closing, tail, features)
        del features
        return _grow(restored, F.conv2d(_grow(x, skip), tail.weight, None, padding=tail.padding))


class OriginalResolutionSubnet(nn.Module):
    """Stage 3: full-resolution blocks that take in the stage-2 U-Net features (ORSNet)."""

    def __init__(self, config: MPRNetConfig) -> None:
        super().__init__()
        n_feat, widths = config.n_feat, config.unet_widths
        width = config.orsnet_width
        self.orb1 = OriginalResolutionBlock(width, config)
        self.orb2 = OriginalResolutionBlock(width, config)
        self.orb3 = OriginalResolutionBlock(width, config)
        self.up_enc1 = UpSample(widths[1], widths[0])
        self.up_dec1 = UpSample(widths[1], widths[0])
        self.up_enc2 = nn.Sequential(UpSample(widths[2], widths[1]), UpSample(widths[1], widths[0]))
        self.up_dec2 = nn.Sequential(UpSample(widths[2], widths[1]), UpSample(widths[1], widths[0]))
        for name in ("conv_enc1", "conv_enc2", "conv_enc3", "conv_dec1", "conv_dec2", "conv_dec3"):
            setattr(self, name, nn.Conv2d(n_feat, width, 1, bias=config.bias))

    def forward(self, x: Tensor, encoded: list[Tensor | None], decoded: list[Tensor | None], tail: nn.Conv2d) -> Tensor:
        """`tail` applied to stage 3's output.

        Empties `encoded` and `decoded` level by level as it goes: each level's U-Net
        features are folded into one skip tensor and released before the next block runs,
        which lowers the forward's peak memory. The last block goes on into `tail`
        (`OriginalResolutionBlock.then`)."""
        *blocks, last = (self.orb1, self.orb2, self.orb3)
        for level, block in enumerate(blocks):
            skip = self._skip(level, encoded, decoded)
            x = _grow(block(x), skip)
        return last.then(tail, x, self._skip(len(blocks), encoded, decoded))

    def _skip(self, level: int, encoded: list[Tensor | None], decoded: list[Tensor | None]) -> Tensor:
        """conv_enc(up_enc(enc)) + conv_dec(up_dec(dec)), as one 1x1 convolution per path at
        the U-Net level's own resolution, then one upsampling per halving of the sum: each
        step is linear and 1x1 convolutions commute with bilinear upsampling, so this is the
        same map with no full-resolution 1x1 convolution and one upsampled tensor, not two."""
        enc, dec = encoded[level], decoded[level]
        encoded[level] = decoded[level] = None
        skip = _grow(F.conv2d(enc, *self._folded("enc", level)), F.conv2d(dec, *self._folded("dec", level)))
        for _ in range(level):
            skip = F.interpolate(skip, scale_factor=2.0, mode="bilinear", align_corners=False)
        return skip

    def _folded(self, path: str, level: int) -> tuple[Tensor, Tensor | None]:
        """Weight and bias of `conv_<path><level+1>` after the 1x1 convolutions of
        `up_<path><level>`, multiplied into one 1x1 convolution, then cast. The product is
        taken exactly (`_exact`)."""
        last = getattr(self, f"conv_{path}{level + 1}")
        weight = _exact(last.weight.flatten(1))
        if level:
            upsamples = getattr(self, f"up_{path}{level}")
            for upsample in reversed(upsamples if isinstance(upsamples, nn.Sequential) else [upsamples]):
                weight = weight @ _exact(upsample.up[1].weight.flatten(1))
        return weight.to(last.weight.dtype)[..., None, None], last.bias


class ShallowFeatures(nn.Sequential):
    """A convolution from the image's channels, then an attention block."""

    def __init__(self, config: MPRNetConfig) -> None:
        super().__init__(
            _conv(config.in_c, config.n_feat, config.kernel_size, config.bias),
            ChannelAttentionBlock(config.n_feat, config),
        )

    def forward(self, image: Tensor) -> Tensor:
        conv, block = self
        features = conv(image)
        if not _composes(image):
            return block(features)
        first, activation, _ = block.body
        return block.finish(features, _two_convolutions(conv, first, image, activation))


class MPRNet(nn.Module):
    """The three-stage network. `forward` takes images whose sides are multiples of
    `SIZE_MULTIPLE` and returns the (stage 3, stage 2, stage 1) restored images.

    `local_attention(train_size)` switches on the test-time local converter (TLC) for the
    forwards run inside it.
    """

    def __init__(self, config: MPRNetConfig) -> None:
        super().__init__()
        self.config = config
        self.shallow_feat1 = ShallowFeatures(config)
        self.shallow_feat2 = ShallowFeatures(config)
        self.shallow_feat3 = ShallowFeatures(config)
        self.stage1_encoder = Encoder(config, fuse_previous=False)
        self.stage1_decoder = Decoder(config)
        self.stage2_encoder = Encoder(config, fuse_previous=True)
        self.stage2_decoder = Decoder(config)
        self.stage3_orsnet = OriginalResolutionSubnet(config)
        self.sam12 = SupervisedAttention(config)
        self.sam23 = SupervisedAttention(config)
        self.concat12 = _conv(2 * config.n_feat, config.n_feat, config.kernel_size, config.bias)
        self.concat23 = _conv(2 * config.n_feat, config.orsnet_width, config.kernel_size, config.bias)
        self.tail = _conv(config.orsnet_width, config.out_c, config.kernel_size, config.bias)

    @contextlib.contextmanager
    def local_attention(self, train_size: int | None) -> Iterator[None]:
        """Inside, every channel attention averages over a local window (Chu et al., ECCV
        2022) fitted to the crops the weights were trained on (`train_size` square); None
        leaves the global means. Outside, as before: the model may be shared."""
        attentions = [module for module in self.modules() if isinstance(module, ChannelAttention)]
        windows = self.tlc_windows(train_size) if train_size is not None else [None] * len(attentions)
        saved = [attention.window for attention in attentions]
        try:
            for attention, window in zip(attentions, windows):
                attention.window = window
            yield
        finally:
            for attention, window in zip(attentions, saved):
                attention.window = window

    def tlc_windows(self, train_size: int) -> list[tuple[int, int]]:
        """Each channel attention's window, in `modules()` order: 1.5 times the map it sees
        when the input is a `train_size` square, rounded down, as TLC fixes them.

        The maps are read off a forward at `SIZE_MULTIPLE` square, where each is the same
        fraction of the input as at any multiple of it: stage 1's encoder sees quarters (at
        256: 128, 64, 32 over its levels, so windows of 192, 96, 48), its decoder and stage
        2's encoder halves (128x256, 64x128, 32x64: windows twice as wide), stage 2's decoder
        and stage 3 the whole image (256: windows of 384). Kept per train size.
        """
        if train_size % SIZE_MULTIPLE or train_size < SIZE_MULTIPLE:
            raise ValueError(f"the TLC train size must be a multiple of {SIZE_MULTIPLE}, got {train_size}")
        cache: dict[int, list[tuple[int, int]]] = self.__dict__.setdefault("_tlc_windows", {})
        if train_size not in cache:
            base = train_size * 3 // 2
            cache[train_size] = [(height * train_size // SIZE_MULTIPLE * base // train_size,
                                  width * train_size // SIZE_MULTIPLE * base // train_size)
                                 for height, width in self._attention_map_sizes()]
        return cache[train_size]

    def _attention_map_sizes(self) -> list[tuple[int, int]]:
        """The map each channel attention sees, per sample, for a `SIZE_MULTIPLE` square input."""
        attentions = [module for module in self.modules() if isinstance(module, ChannelAttention)]
        sizes: dict[nn.Module, tuple[int, int]] = {}

        def record(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            sizes.setdefault(module, (inputs[0].shape[-2], inputs[0].shape[-1]))

        hooks = [attention.register_forward_pre_hook(record) for attention in attentions]
        parameter = next(self.parameters())
        try:
            with torch.inference_mode(), self.local_attention(None):
                self(torch.zeros(1, self.config.in_c, SIZE_MULTIPLE, SIZE_MULTIPLE, device=parameter.device,
                                 dtype=parameter.dtype))
        finally:
            for hook in hooks:
                hook.remove()
        return [sizes[attention] for attention in attentions]

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        height, width = image.shape[-2:]
        if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
            raise ValueError(f"MPRNet needs sides that are multiples of {SIZE_MULTIPLE}, got {height}x{width}")
        # Batch layout: stage 2 works on [top; bottom] halves, stage 1 on
        # [top-left; bottom-left; top-right; bottom-right] quarters.
        halves = _split(image, dim=2)
        quarters = _split(halves, dim=3)

        # Stage 1: encode the quarters, decode the halves.
        encoded1 = [_join(f, dim=3) for f in self.stage1_encoder(self.shallow_feat1(quarters))]
        decoded1 = self.stage1_decoder(encoded1)
        gated1, stage1_halves = self.sam12(decoded1[0], halves)

        # Stage 2: encode the halves with stage-1 fusion, decode the whole image.
        x2 = self.concat12(torch.cat([self.shallow_feat2(halves), gated1], dim=1))
        encoded2 = [_join(f, dim=2) for f in self.stage2_encoder(x2, encoded1, decoded1)]
        del encoded1, decoded1, gated1, x2
        decoded2 = self.stage2_decoder(encoded2)
        gated2, stage2_image = self.sam23(decoded2[0], image)

        # Stage 3: full resolution.
        x3 = self.concat23(torch.cat([self.shallow_feat3(image), gated2], dim=1))
        del gated2
        restored = self.stage3_orsnet(x3, encoded2, decoded2, self.tail)  # releases encoded2 and decoded2 as it goes
        return _grow(restored, image), stage2_image, _join(stage1_halves, dim=2)
