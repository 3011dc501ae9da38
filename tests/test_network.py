"""Our MPRNet against the authors': same state-dict layout, same numbers."""

from __future__ import annotations

import json
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mprnet_cli.checkpoints import read_state_dict
from mprnet_cli.devices import cpu_has_native_bf16
from mprnet_cli.model.config import TASK_CONFIGS, MPRNetConfig, infer_config
from mprnet_cli.model import kernels, network
from mprnet_cli.model.network import MPRNet, UpSample, _conv_prelu, _gate_and_add, _two_convolutions
from mprnet_cli.model.restorer import Restorer

from .conftest import DATA, PARITY, TINY_CHECKPOINT
from .test_kernels import assert_kernel_builds

MANIFEST = json.loads((DATA / "state_dict_manifest.json").read_text())


@pytest.mark.parametrize("task", sorted(TASK_CONFIGS))
def test_state_dict_has_the_published_keys_shapes_and_order(task: str) -> None:
    expected = MANIFEST[task]
    assert MPRNetConfig(**expected["config"]) == TASK_CONFIGS[task]
    with torch.device("meta"):
        model = MPRNet(TASK_CONFIGS[task])
    actual = [[key, list(tensor.shape)] for key, tensor in model.state_dict().items()]
    assert actual == expected["tensors"]
    assert sum(tensor.numel() for tensor in model.state_dict().values()) == expected["num_params"]


@pytest.mark.parametrize("task", sorted(TASK_CONFIGS))
def test_config_is_read_back_from_shapes(task: str) -> None:
    with torch.device("meta"):
        state = MPRNet(TASK_CONFIGS[task]).state_dict()
    assert infer_config(state) == TASK_CONFIGS[task]


def test_unusual_hyper_parameters_are_read_back() -> None:
    config = MPRNetConfig(n_feat=12, scale_unetfeats=4, scale_orsnetfeats=6, num_cab=3, reduction=3, bias=True)
    assert infer_config(MPRNet(config).state_dict()) == config


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("size", ["64x48", "61x45"])
def test_stage_outputs_match_the_authors_code(size: str, channels_last: bool) -> None:
    """Channels-last is the layout the tool runs in; oneDNN takes other kernels for it."""
    expected = np.load(PARITY / f"expected_{size}.npz")
    state = read_state_dict(TINY_CHECKPOINT)
    model = MPRNet(infer_config(state))
    model.load_state_dict(state)
    image = torch.from_numpy(expected["padded_input"])[None]
    if channels_last:
        model, image = model.to(memory_format=torch.channels_last), image.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        outputs = model.eval()(image)
    for name, output in zip(("stage3", "stage2", "stage1"), outputs):
        np.testing.assert_allclose(output[0].numpy(), expected[name], atol=1e-5, rtol=0)


def test_batched_images_are_restored_independently() -> None:
    torch.manual_seed(0)
    model = MPRNet(MPRNetConfig(n_feat=8, scale_unetfeats=4, scale_orsnetfeats=4, num_cab=1)).eval()
    images = torch.rand(2, 3, 32, 48)
    with torch.inference_mode():
        together = model(images)[0]
        alone = torch.cat([model(images[i : i + 1])[0] for i in range(2)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bias", [False, True])
def test_fused_in_place_inference_gives_the_same_numbers_and_training_still_backpropagates(bias: bool) -> None:
    torch.manual_seed(0)
    model = MPRNet(MPRNetConfig(n_feat=8, scale_unetfeats=4, scale_orsnetfeats=4, num_cab=1, bias=bias)).eval()
    image = torch.rand(1, 3, 32, 48)
    with torch.inference_mode():
        fused = model(image)
    with torch.no_grad():
        plain = model(image)
    for a, b in zip(fused, plain):  # fused multiply-adds round once instead of twice; composed kernels
        torch.testing.assert_close(a, b, atol=5e-6, rtol=0)
    model(image)[0].mean().backward()  # no "modified by an inplace operation" error
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)])
def test_the_model_traces_as_one_graph_for_torch_compile(dtype: torch.dtype, tolerance: float) -> None:
    """The eager fusions step aside while compiling; before they did, they split the derain
    network into 53 graphs, each compiled and called on its own."""
    torch.manual_seed(0)
    model = MPRNet(MPRNetConfig(n_feat=8, scale_unetfeats=4, scale_orsnetfeats=4, num_cab=1)).eval().to(dtype)
    image = torch.rand(1, 3, 32, 48, dtype=dtype).contiguous(memory_format=torch.channels_last)
    torch._dynamo.reset()
    traced = torch.compile(model, backend="eager", fullgraph=True, dynamic=False)
    with torch.inference_mode():
        expected = model(image)[0]
        got = traced(image)[0]
    torch.testing.assert_close(got.float(), expected.float(), atol=tolerance, rtol=0)


_ONEDNN_BF16 = cpu_has_native_bf16()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_convolution_and_prelu_fuse_on_the_cpu(bias: bool, channels_last: bool, dtype: torch.dtype,
                                               tolerance: float) -> None:
    if dtype == torch.bfloat16 and not _ONEDNN_BF16:
        pytest.skip("this CPU has no bf16 instructions for oneDNN")
    torch.manual_seed(0)
    conv, activation = nn.Conv2d(8, 8, 3, padding=1, bias=bias).to(dtype), nn.PReLU(init=0.3).to(dtype)
    image = torch.randn(2, 8, 16, 24, dtype=dtype)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        plain = activation(conv(image))
    with torch.inference_mode(), mock.patch.object(nn.PReLU, "forward", side_effect=AssertionError("not fused")):
        fused = _conv_prelu(conv, activation, image)
    torch.testing.assert_close(fused, plain, atol=tolerance, rtol=tolerance)


def test_bf16_is_not_fused_where_onednn_lacks_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    conv, activation = nn.Conv2d(4, 4, 3, padding=1).bfloat16(), nn.PReLU().bfloat16()
    with torch.inference_mode(), mock.patch.object(nn.PReLU, "forward", wraps=activation.forward) as called:
        _conv_prelu(conv, activation, torch.randn(1, 4, 8, 8, dtype=torch.bfloat16))
    called.assert_called_once()


@pytest.mark.parametrize("bias", [False, True])
def test_orsnet_skips_equal_the_published_chain_of_upsamplings_and_convolutions(bias: bool) -> None:
    torch.manual_seed(0)
    config = MPRNetConfig(n_feat=8, scale_unetfeats=4, scale_orsnetfeats=4, num_cab=1, bias=bias)
    orsnet = MPRNet(config).stage3_orsnet
    encoded = [torch.randn(1, width, 32 >> level, 48 >> level) for level, width in enumerate(config.unet_widths)]
    decoded = [torch.randn_like(features) for features in encoded]
    for level in range(3):
        enc, dec = encoded[level], decoded[level]
        if level:  # the authors' order: each UpSample upsamples, then convolves
            for upsample in getattr(orsnet, f"up_enc{level}").modules():
                enc = upsample.up(enc) if isinstance(upsample, UpSample) else enc
            for upsample in getattr(orsnet, f"up_dec{level}").modules():
                dec = upsample.up(dec) if isinstance(upsample, UpSample) else dec
        expected = getattr(orsnet, f"conv_enc{level + 1}")(enc) + getattr(orsnet, f"conv_dec{level + 1}")(dec)
        with torch.no_grad():
            folded = orsnet._skip(level, list(encoded), list(decoded))
        torch.testing.assert_close(folded, expected.detach(), atol=1e-5, rtol=1e-5)


def test_a_prelu_with_a_slope_per_channel_is_not_fused() -> None:
    conv, activation = nn.Conv2d(4, 4, 3, padding=1), nn.PReLU(num_parameters=4)
    image = torch.randn(1, 4, 8, 8)
    with torch.inference_mode(), mock.patch.object(nn.PReLU, "forward", wraps=activation.forward) as called:
        _conv_prelu(conv, activation, image)
    called.assert_called_once()


def test_sides_that_are_not_multiples_of_eight_are_refused() -> None:
    model = MPRNet(MPRNetConfig(n_feat=8, scale_unetfeats=4, scale_orsnetfeats=4, num_cab=1))
    with pytest.raises(ValueError, match="multiples of 8"):
        model(torch.rand(1, 3, 12, 16))


@pytest.mark.parametrize("channels", [56, 128])
def test_gating_in_bf16_matches_the_plain_product_and_sum(channels: int) -> None:
    torch.manual_seed(0)
    features, residual = (torch.randn(2, channels, 6, 10, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
                          for _ in range(2))
    gate = torch.rand(2, channels, 1, 1, dtype=torch.bfloat16)
    expected = torch.addcmul(residual, features, gate)
    with torch.inference_mode():
        gated = _gate_and_add(features.clone(), gate, residual)
    assert torch.equal(gated, expected)


@pytest.mark.parametrize("kernel", [3, 5])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("with_activation", [False, True])
def test_two_convolutions_run_as_one_equal_the_two_in_turn(kernel: int, bias: bool, with_activation: bool) -> None:
    """Odd sides, a batch of two and channels-last: the ring taken the two-step way must
    line up with the composed interior on every side of every image."""
    torch.manual_seed(0)
    first = nn.Conv2d(3, 6, kernel, padding=kernel // 2, bias=bias)
    second = nn.Conv2d(6, 5, kernel, padding=kernel // 2, bias=bias)
    activation = nn.PReLU(init=0.3) if with_activation else None
    image = torch.randn(2, 3, 11, 17).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = second(first(image))
        expected = activation(expected) if activation else expected
    with torch.inference_mode(), mock.patch.object(network, "_composed_kernel", wraps=network._composed_kernel) as kernels:
        composed = _two_convolutions(first, second, image, activation)
    kernels.assert_called_once()
    torch.testing.assert_close(composed, expected, atol=1e-5, rtol=1e-5)


def test_sides_too_short_for_a_ring_are_convolved_in_turn() -> None:
    torch.manual_seed(0)
    first, second = nn.Conv2d(3, 4, 5, padding=2), nn.Conv2d(4, 2, 5, padding=2)
    image = torch.randn(1, 3, 5, 16)  # under 3 x padding rows
    with torch.inference_mode(), mock.patch.object(network, "_composed_kernel", side_effect=AssertionError("composed")):
        got = _two_convolutions(first, second, image)
    with torch.no_grad():
        torch.testing.assert_close(got, second(first(image)), atol=1e-6, rtol=0)


def test_shallow_features_and_the_tail_are_composed_in_cpu_inference_only() -> None:
    """Not under `no_grad` (training code, the published recipe) nor on other devices
    (here "meta", which runs the shapes only)."""
    config = MPRNetConfig(n_feat=8, scale_unetfeats=4, scale_orsnetfeats=4, num_cab=1)
    model = MPRNet(config).eval()
    image = torch.rand(1, 3, 16, 24)
    with mock.patch.object(network, "_two_convolutions", wraps=_two_convolutions) as composed:
        with torch.inference_mode():
            model(image)
        assert composed.call_count == 4  # three stages' shallow features, and stage 3's closing convolution with the tail
        with torch.no_grad():
            model(image)
        with torch.device("meta"), torch.inference_mode():
            MPRNet(config).eval()(torch.rand(1, 3, 16, 24))
        assert composed.call_count == 4


@pytest.mark.parametrize("config", [
    MPRNetConfig(n_feat=8, scale_unetfeats=4, scale_orsnetfeats=4, num_cab=0),
    MPRNetConfig(n_feat=8, scale_unetfeats=4, scale_orsnetfeats=4, num_cab=1, kernel_size=1),
    MPRNetConfig(n_feat=8, scale_unetfeats=4, scale_orsnetfeats=4, num_cab=1, kernel_size=5, bias=True),
], ids=["no-attention-blocks", "kernel-1", "kernel-5-bias"])
def test_composed_inference_equals_the_plain_path_for_unusual_checkpoints(config: MPRNetConfig) -> None:
    """Shapes any checkpoint may have: an ORB with no attention blocks (its closing
    convolution then reads the block's input, which the residual sum must not change
    first) and 1x1 kernels (nothing padded, so no ring)."""
    torch.manual_seed(0)
    model = MPRNet(config).eval()
    image = torch.rand(2, 3, 8, 24)
    with torch.inference_mode():
        composed = model(image)[0]
    with torch.no_grad():
        plain = model(image)[0]
    torch.testing.assert_close(composed, plain, atol=5e-6, rtol=0)


# --- The test-time local converter (TLC) ----------------------------------------------------


def _direct_local_mean(x: Tensor, window: tuple[int, int]) -> Tensor:
    """TLC's pooling the slow way: the mean of the window at every position where it lies
    inside the map (each side clamped to the map's), in float64, then the edges replicated,
    half the missing rows and columns (rounded down) before, one position at a time."""
    height, width = x.shape[-2:]
    window_height, window_width = min(window[0], height), min(window[1], width)
    rows, columns = height - window_height + 1, width - window_width + 1
    valid = torch.empty(*x.shape[:2], rows, columns, dtype=torch.float64)
    for row in range(rows):
        for column in range(columns):
            valid[..., row, column] = x[..., row:row + window_height, column:column + window_width].double().mean(dim=(-2, -1))
    top, left = (height - rows) // 2, (width - columns) // 2
    row_of = [min(max(row - top, 0), rows - 1) for row in range(height)]
    column_of = [min(max(column - left, 0), columns - 1) for column in range(width)]
    return valid[..., row_of, :][..., column_of].to(x.dtype)


@pytest.mark.parametrize("inference", [True, False], ids=["inference", "autograd"])
@pytest.mark.parametrize("window", [(3, 5), (4, 4), (13, 2), (30, 30), (1, 1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_local_means_equal_direct_pooling_on_odd_sizes(window: tuple[int, int], dtype: torch.dtype,
                                                       inference: bool) -> None:
    """Inference on the CPU takes running sums slice by slice; elsewhere, with cumsum."""
    x = (torch.rand(2, 5, 13, 11, dtype=torch.float64) * 4 - 1).to(dtype).contiguous(memory_format=torch.channels_last)
    before = x.clone()
    with torch.inference_mode(inference):
        ours = network.replicate_to(network.local_mean(x, window), 13, 11)
    assert torch.equal(x, before)  # the input is left alone
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 0}[dtype]  # fp32: an 11-long running sum
    if dtype == torch.bfloat16:  # both round a float sum to bf16 once; a tie may round to a neighbour
        torch.testing.assert_close(ours.double(), _direct_local_mean(x, window).double(), atol=2**-7 * 3, rtol=2**-8)
    else:
        torch.testing.assert_close(ours, _direct_local_mean(x, window), atol=tolerance, rtol=0)


@pytest.mark.parametrize("accumulator_bytes", [1 << 20, 400, 1])  # runs of sqrt(n), of 2 slices (192 bytes each), of 1
@pytest.mark.parametrize("count", [1, 2, 3, 8, 9, 10, 17, 30])
@pytest.mark.parametrize("dim", [2, 3])
def test_running_sums_and_totals_in_blocks_equal_cumsum_and_sum(count: int, dim: int, accumulator_bytes: int,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Every split into blocks and runs, with some left over or none, along either axis."""
    monkeypatch.setattr(network, "ACCUMULATOR_BYTES", accumulator_bytes)
    shape = [2, 3, 4, 4]
    shape[dim] = count
    x = torch.rand(shape, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        running = x.clone()
        network._running_sums_(running, dim)
        total = torch.empty_like(x.narrow(dim, 0, 1))
        network._add_up_slices(x, dim, out=total)
    torch.testing.assert_close(running, x.cumsum(dim), atol=1e-12, rtol=0)
    torch.testing.assert_close(total, x.sum(dim, keepdim=True), atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gate_size", [(1, 1), (5, 7), (1, 7), (13, 7), (5, 11), (13, 11), (5, 1), (13, 1)])
def test_gating_replicates_a_smaller_gate_as_the_border_rule_says(gate_size: tuple[int, int], dtype: torch.dtype) -> None:
    """In bands (inference) or from the replicated gate (autograd), the same product."""
    torch.manual_seed(0)
    features, residual = (torch.randn(2, 6, 13, 11, dtype=dtype).contiguous(memory_format=torch.channels_last)
                          for _ in range(2))
    gate = torch.rand(2, 6, *gate_size, dtype=dtype).contiguous(memory_format=torch.channels_last)
    expected = torch.addcmul(residual, features, network.replicate_to(gate, 13, 11))
    with torch.inference_mode():
        banded = _gate_and_add(features.clone(), gate, residual)
    assert torch.equal(banded, expected)
    assert torch.equal(_gate_and_add(features.clone(), gate, residual), expected)


def _pooled_local_mean(x: Tensor, window: tuple[int, int]) -> Tensor:
    """TLC's pooling by plain average pooling (each window summed afresh), in float64, then
    `_direct_local_mean`'s border rule: quicker than it, for whole networks."""
    height, width = x.shape[-2:]
    kernel = (min(window[0], height), min(window[1], width))
    valid = F.avg_pool2d(x.double(), kernel, stride=1)
    missing_height, missing_width = height - valid.shape[-2], width - valid.shape[-1]
    padding = (missing_width // 2, missing_width - missing_width // 2, missing_height // 2,
               missing_height - missing_height // 2)
    return F.pad(valid, padding, mode="replicate").to(x.dtype)


def test_pooled_reference_is_the_direct_one() -> None:
    x = torch.rand(1, 2, 9, 14, dtype=torch.float64)
    torch.testing.assert_close(_pooled_local_mean(x, (4, 20)), _direct_local_mean(x, (4, 20)), atol=1e-12, rtol=0)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-6), (torch.bfloat16, 2**-8)])
@pytest.mark.parametrize("bias", [False, True])
def test_local_gates_fused_on_the_cpu_equal_the_plain_ones(dtype: torch.dtype, tolerance: float, bias: bool) -> None:
    if dtype == torch.bfloat16 and not cpu_has_native_bf16():
        pytest.skip("oneDNN computes bf16 natively only on CPUs with bf16 instructions")
    torch.manual_seed(0)
    attention = network.ChannelAttention(16, 4, bias).to(dtype=dtype, memory_format=torch.channels_last)
    attention.window = (5, 7)
    x = torch.rand(1, 16, 12, 20, dtype=dtype).contiguous(memory_format=torch.channels_last)
    with mock.patch.object(network, "local_mean", side_effect=network.local_mean) as pooled:
        with torch.inference_mode():
            fused = attention(x)
        plain = attention(x)  # outside inference: the plain modules
    assert pooled.call_count == 2
    assert fused.shape == plain.shape == (1, 16, 8, 14)  # the windows inside the map
    torch.testing.assert_close(fused, plain.detach(), atol=tolerance, rtol=0)


@pytest.mark.parametrize("inference", [True, False], ids=["inference", "autograd"])
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-12), (torch.float32, 1e-6), (torch.bfloat16, 2**-7)])
def test_local_gates_are_the_gate_of_each_windows_mean(dtype: torch.dtype, tolerance: float, inference: bool) -> None:
    """TLC's definition, whichever order the gate takes its steps in: `conv_du` on the mean
    of `x` over each window that lies inside the map."""
    if dtype == torch.bfloat16 and not cpu_has_native_bf16():
        pytest.skip("oneDNN computes bf16 natively only on CPUs with bf16 instructions")
    torch.manual_seed(0)
    attention = network.ChannelAttention(16, 4, True).to(dtype=dtype, memory_format=torch.channels_last)
    attention.window = (5, 7)
    x = (torch.rand(2, 16, 12, 21, dtype=dtype) * 4 - 1).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(inference):
        gate = attention(x)
    means = F.avg_pool2d(x.double(), (5, 7), stride=1)  # every window inside the map, each summed afresh
    expected = attention.double().conv_du(means)
    assert gate.shape == expected.shape == (2, 16, 8, 15)
    torch.testing.assert_close(gate.double(), expected.detach(), atol=tolerance, rtol=0)


def _tiny_model() -> MPRNet:
    state = read_state_dict(TINY_CHECKPOINT)
    model = MPRNet(infer_config(state))
    model.load_state_dict(state)
    return model.eval()


def test_tlc_windows_are_one_and_a_half_times_the_maps_seen_at_the_train_size() -> None:
    """Read here off a forward at the train size itself, as TLC does it."""
    model = _tiny_model()
    seen: dict[nn.Module, tuple[int, int]] = {}

    def record(module: nn.Module, inputs: tuple[Tensor]) -> None:
        seen[module] = tuple(inputs[0].shape[-2:])

    hooks = [module.register_forward_pre_hook(record)
             for module in model.modules() if isinstance(module, network.ChannelAttention)]
    with torch.inference_mode():
        model(torch.rand(1, 3, 64, 64))
    for hook in hooks:
        hook.remove()
    attentions = [module for module in model.modules() if isinstance(module, network.ChannelAttention)]
    assert model.tlc_windows(64) == [(seen[module][0] * 3 // 2, seen[module][1] * 3 // 2) for module in attentions]
    # Quarters (32, 16, 8 at train size 64), halves (32x64...) and the whole image (64...), times 1.5.
    assert set(model.tlc_windows(64)) == {(48, 48), (24, 24), (12, 12), (48, 96), (24, 48), (12, 24), (96, 96)}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("size", [(64, 64), (61, 45), (30, 17)])
def test_tlc_changes_nothing_up_to_the_training_crop(precision: str, size: tuple[int, int]) -> None:
    model = _tiny_model()
    image = np.random.default_rng(0).random((*size, 3), dtype=np.float32)
    plain = Restorer(model, device="cpu", precision=precision, tile=0).restore(image)
    local = Restorer(model, device="cpu", precision=precision, tile=0, tlc_train_size=64).restore(image)
    np.testing.assert_array_equal(local, plain)


# bf16 with the kernel is left to tests/test_kernels.py: the kernel keeps the gate in fp32
# where the tensor operations round it to bf16, which moves this output about as much as
# TLC itself does in bf16 (0.012 at most); each is as far from the fp32 output.
@pytest.mark.parametrize(("precision", "tile", "tolerance", "kernel"), [
    ("fp32", 0, 2e-6, True), ("fp32", 32, 2e-6, True),
    ("fp32", 0, 2e-6, False), ("fp32", 32, 2e-6, False), ("bf16", 0, 2**-8, False)])
def test_tlc_agrees_with_direct_pooling_in_every_path(precision: str, tile: int, tolerance: float, kernel: bool,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The restorer's path (channels-last, fused convolutions, tiles, bf16, the compiled
    kernel or not) on an odd size whose maps exceed the windows (train size 16: windows 24
    and 12 at the quarters' first level), against the same run with the pooling done
    directly, as tensor operations."""
    if kernel:
        assert_kernel_builds()
    else:
        monkeypatch.setattr(kernels, "library", lambda: None)
    model = _tiny_model()
    image = np.random.default_rng(1).random((61, 45, 3), dtype=np.float32)
    restorer = Restorer(model, device="cpu", precision=precision, tile=tile, tile_overlap=8, tlc_train_size=16)
    with mock.patch.object(kernels, "local_gate_and_add", side_effect=kernels.local_gate_and_add) as compiled:
        fast = restorer.restore(image)
    assert compiled.called == kernel
    monkeypatch.setattr(kernels, "library", lambda: None)
    monkeypatch.setattr(network, "local_mean", _pooled_local_mean)  # full-size means: nothing left to replicate
    slow = restorer.restore(image)
    plain = Restorer(model, device="cpu", precision=precision, tile=tile, tile_overlap=8).restore(image)
    assert np.abs(fast - plain).max() > 2 * tolerance  # TLC does change this output
    np.testing.assert_allclose(fast, slow, atol=tolerance, rtol=0)


def test_tlc_trains_and_leaves_the_model_as_it_was() -> None:
    """Outside inference (the plain NCHW path, with autograd), and shared models keep their
    global attention outside the context."""
    model = _tiny_model()
    image = torch.rand(1, 3, 40, 56, requires_grad=True)
    with model.local_attention(16):
        local = model(image)[0]
    local.sum().backward()
    assert image.grad is not None and torch.isfinite(image.grad).all()
    with torch.inference_mode():
        plain = model(image.detach())[0]
        with model.local_attention(16):
            again = model(image.detach())[0]
    assert all(module.window is None for module in model.modules() if isinstance(module, network.ChannelAttention))
    torch.testing.assert_close(again, local.detach(), atol=1e-5, rtol=0)
    assert (plain - local.detach()).abs().max() > 1e-4


def test_tlc_off_the_cpu_needs_no_values_to_plan_its_work() -> None:
    """What a CUDA graph asks of it: the path of every device but the CPU (running sums by
    `cumsum`, the gate applied in bands) runs on the meta device, which holds no values, so
    a host sync (`.item()`, a tensor's truth) or a shape that depends on values fails there."""
    model = _tiny_model()
    model.tlc_windows(16)  # read off a CPU forward, as the Restorer does before any other
    model = model.to("meta")
    attentions = [module for module in model.modules() if isinstance(module, network.ChannelAttention)]
    image = torch.empty(1, 3, 64, 48, device="meta").contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), model.local_attention(16), \
            mock.patch.object(network, "local_mean", wraps=network.local_mean) as pooled, \
            mock.patch.object(network, "_add_up_slices", wraps=network._add_up_slices) as cpu_only:
        restored = model(image)[0]
    assert restored.shape == (1, 3, 64, 48) and restored.device.type == "meta"
    assert pooled.call_count == len(attentions) == 55  # every window smaller than its map
    cpu_only.assert_not_called()


def test_tlc_train_size_must_suit_the_network() -> None:
    with pytest.raises(ValueError, match="the TLC train size must be a multiple of 8, got 100"):
        Restorer(_tiny_model(), device="cpu", tlc_train_size=100)
