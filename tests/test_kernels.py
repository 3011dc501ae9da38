"""TLC's compiled kernel: the same gate and apply as the tensor operations, and a build
that falls back to them whenever it cannot be made."""

from __future__ import annotations

import logging
import os
import platform
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import pytest
import torch

from mprnet_cli import devices
from mprnet_cli.model import kernels, network


@pytest.fixture
def fresh_build() -> Iterator[None]:
    """The test finds the library unbuilt in this process (its HOME, and so its cache, is
    fresh: conftest), and leaves it so."""
    kernels.library.cache_clear()
    yield
    kernels.library.cache_clear()


def assert_kernel_builds() -> None:
    """Where a C compiler exists, the kernel must build: tests that exercise it then cannot
    pass by falling back."""
    if shutil.which(kernels.c_compiler()[0]) is None:
        pytest.skip("no C compiler: TLC runs as tensor operations here")
    assert kernels.library() is not None, "the kernel did not build (run with MPRNET_DEBUG=1 for why)"


def _attention(channels: int, bias: bool, dtype: torch.dtype, window: tuple[int, int]) -> network.ChannelAttention:
    attention = network.ChannelAttention(channels, 4, bias).to(dtype=dtype, memory_format=torch.channels_last)
    attention.window = window
    return attention


def _maps(batch: int, channels: int, height: int, width: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    x = (torch.rand(batch, channels, height, width) * 4 - 1).to(dtype).contiguous(memory_format=torch.channels_last)
    return x, torch.randn_like(x)


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One kernel cache for the session, so that each instruction set is built once."""
    return tmp_path_factory.mktemp("kernels")


@pytest.fixture(params=["native", "-mno-avx512bf16", "-mno-avx512f"],
                ids=["native", "without AVX-512 bf16", "without AVX-512"])
def instructions(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, shared_cache: Path) -> Iterator[None]:
    """The kernel as built for this CPU, and as built for x86 CPUs with less of AVX-512:
    each takes its own code for the sigmoid, the second convolution and the rounding."""
    if request.param != "native":
        if platform.machine().lower() not in ("x86_64", "amd64"):
            pytest.skip("x86 instruction sets")
        monkeypatch.setenv("CC", f"{os.environ.get('CC') or 'cc'} {request.param}")
    monkeypatch.setenv("XDG_CACHE_HOME", str(shared_cache))
    kernels.library.cache_clear()
    yield
    kernels.library.cache_clear()


@pytest.mark.usefixtures("instructions")
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 2e-6), (torch.bfloat16, 2**-6)])
@pytest.mark.parametrize(("batch", "channels", "size", "window", "bias"), [
    (2, 16, (12, 20), (5, 7), True),     # C one vector wide; two images
    (1, 40, (23, 31), (30, 9), False),   # C not a whole number of vectors; the window taller than the map
    (1, 80, (9, 50), (4, 60), True),     # four vectors and one more; wider than the map
    (3, 24, (17, 13), (16, 2), True),    # a single row of windows; three images
    (1, 60, (14, 15), (3, 4), False),    # an odd number of reduced channels (15): bf16 pairs with a zero
])
def test_the_kernel_gives_what_the_tensor_operations_give(batch: int, channels: int, size: tuple[int, int],
                                                          window: tuple[int, int], bias: bool, dtype: torch.dtype,
                                                          tolerance: float) -> None:
    """Including the border rule: the rows and columns outside the windows take the
    nearest window's gate. bf16 differs by the gate's rounding, which the kernel skips."""
    assert_kernel_builds()
    torch.manual_seed(0)
    attention = _attention(channels, bias, dtype, window)
    x, residual = _maps(batch, channels, *size, dtype)
    with torch.inference_mode():
        expected = network._gate_and_add(x.clone(), attention(x), residual)
        with mock.patch.object(kernels, "local_gate_and_add", side_effect=kernels.local_gate_and_add) as compiled:
            out = x.clone()
            result = attention.gate_and_add(out, residual)
    assert compiled.call_count == 1
    assert result.data_ptr() == out.data_ptr()  # written in place, as the tensor operations are
    torch.testing.assert_close(result.float(), expected.float(), atol=tolerance, rtol=tolerance)


@pytest.mark.usefixtures("instructions")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_saturated_gate_is_zero_or_one(dtype: torch.dtype) -> None:
    """Sums far past the sigmoid's range (exp overflows) give gates of exactly 0 and 1,
    never NaN."""
    assert_kernel_builds()
    torch.manual_seed(0)
    attention = _attention(16, True, dtype, (3, 3))
    with torch.no_grad():
        attention.conv_du[2].bias.copy_(torch.tensor([1000.0, -1000.0] * 8))
    x, residual = _maps(1, 16, 7, 9, dtype)
    with torch.inference_mode():
        result = attention.gate_and_add(x.clone(), residual)
    expected = torch.where(torch.arange(16).reshape(1, 16, 1, 1) % 2 == 0, x + residual, residual)
    torch.testing.assert_close(result, expected, atol=0, rtol=0)


@pytest.mark.parametrize("case", ["global window", "autograd", "contiguous", "float64"])
def test_maps_the_kernel_does_not_take_go_to_the_tensor_operations(case: str) -> None:
    assert_kernel_builds()
    torch.manual_seed(0)
    dtype = torch.float64 if case == "float64" else torch.float32
    attention = _attention(16, True, dtype, (12, 20) if case == "global window" else (5, 7))
    x, residual = _maps(1, 16, 12, 20, dtype)
    if case == "contiguous":
        x, residual = x.contiguous(), residual.contiguous()
    expected = network._gate_and_add(x.clone(), attention(x), residual).detach()
    with mock.patch.object(kernels, "local_gate_and_add") as compiled, torch.inference_mode(case != "autograd"):
        result = attention.gate_and_add(x.clone(), residual)
    compiled.assert_not_called()
    torch.testing.assert_close(result, expected)


def _fallback_is_logged(caplog: pytest.LogCaptureFixture, reason: str) -> None:
    with caplog.at_level(logging.DEBUG, logger="mprnet"):
        assert kernels.library() is None
    assert any(reason in record.getMessage() for record in caplog.records), caplog.text


@pytest.mark.usefixtures("fresh_build")
def test_without_a_compiler_tlc_runs_as_tensor_operations(monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("CC", "/nonexistent/cc")
    _fallback_is_logged(caplog, "no C compiler (/nonexistent/cc)")
    attention = _attention(16, True, torch.float32, (5, 7))
    x, residual = _maps(1, 16, 12, 20, torch.float32)
    with torch.inference_mode():
        expected = network._gate_and_add(x.clone(), attention(x), residual)
        torch.testing.assert_close(attention.gate_and_add(x.clone(), residual), expected)


@pytest.mark.usefixtures("fresh_build")
def test_a_compiler_that_fails_is_a_fallback_with_its_message(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    failing = tmp_path / "cc"
    failing.write_text("#!/bin/sh\necho 'cc: error: unrecognized option' >&2\nexit 1\n")
    failing.chmod(failing.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CC", str(failing))
    _fallback_is_logged(caplog, "did not compile: cc: error: unrecognized option")
    assert not list(kernels.cache_dir().glob("*")), "no partial library is left behind"


@pytest.mark.usefixtures("fresh_build")
def test_it_can_be_turned_off(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("MPRNET_TLC_KERNEL", "0")
    _fallback_is_logged(caplog, "MPRNET_TLC_KERNEL=0")


@pytest.fixture
def counted_builds(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[[], int]:
    """CC set to the C compiler behind a script that counts its runs; returns the count."""
    compiler = shutil.which("cc")
    if compiler is None:
        pytest.skip("no C compiler")
    calls = tmp_path / "calls"
    counting = tmp_path / "counting-cc"
    counting.write_text(f"#!/bin/sh\necho >> {calls}\nexec {compiler} \"$@\"\n")
    counting.chmod(counting.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CC", str(counting))
    return lambda: len(calls.read_text().splitlines()) if calls.exists() else 0


@pytest.mark.usefixtures("fresh_build")
def test_the_library_is_built_once_per_machine(counted_builds: Callable[[], int]) -> None:
    assert kernels.library() is not None and counted_builds() == 1
    kernels.library.cache_clear()  # as a new process on the same machine
    assert kernels.library() is not None and counted_builds() == 1
    assert [path.name for path in kernels.cache_dir().iterdir()] == [kernels.library_path([os.environ["CC"]]).name]


@pytest.mark.usefixtures("fresh_build")
def test_a_damaged_library_in_the_cache_is_rebuilt(counted_builds: Callable[[], int]) -> None:
    target = kernels.library_path([os.environ["CC"]])
    target.parent.mkdir(parents=True)
    target.write_bytes(b"not a library")  # as a full disk or a crashed copy might leave it
    assert kernels.library() is not None and counted_builds() == 1
    assert [path.name for path in kernels.cache_dir().iterdir()] == [target.name]


@pytest.mark.usefixtures("fresh_build")
def test_a_cache_that_cannot_be_written_is_a_fallback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))
    _fallback_is_logged(caplog, "could not be built or loaded")


def test_a_kernel_out_of_memory_is_the_out_of_memory_the_restorer_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel returns non-zero when its row buffers cannot be allocated."""
    def failing(*arguments: object) -> int:
        return 1

    monkeypatch.setattr(kernels, "library", lambda: mock.Mock(mprnet_tlc_fp32=failing))
    attention = _attention(16, True, torch.float32, (5, 7))
    x, residual = _maps(1, 16, 12, 20, torch.float32)
    with torch.inference_mode(), pytest.raises(RuntimeError) as raised:
        attention.gate_and_add(x, residual)
    assert devices.is_out_of_memory(raised.value)
