"""Device and precision choice, including the CUDA paths this CPU-only CI can only simulate."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mprnet_cli import devices
from mprnet_cli.errors import DeviceError


def _fake_cuda(monkeypatch: pytest.MonkeyPatch, count: int, bf16: bool = True) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)


def _fake_mps(monkeypatch: pytest.MonkeyPatch, available: bool) -> None:
    monkeypatch.setattr(devices, "_mps_available", lambda: available)


def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch, 2)
    _fake_mps(monkeypatch, True)
    assert devices.resolve_device("auto") == torch.device("cuda")
    _fake_cuda(monkeypatch, 0)
    assert devices.resolve_device("auto") == torch.device("mps")
    _fake_mps(monkeypatch, False)
    assert devices.resolve_device("auto") == torch.device("cpu")


def test_named_cuda_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch, 2)
    assert devices.resolve_device("cuda") == torch.device("cuda", 0)
    assert devices.resolve_device("CUDA:1") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match=r"--device cuda:2: only 2 CUDA device\(s\) here \(cuda:0 to cuda:1\)"):
        devices.resolve_device("cuda:2")
    with pytest.raises(DeviceError, match="expected cuda or cuda:N"):
        devices.resolve_device("cuda:x")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("cuda", "--device cuda: no CUDA GPU is available"),
        ("mps", "--device mps: Apple's MPS backend is not available on this machine"),
        ("tpu", "--device tpu: expected one of auto, cpu, cuda, cuda:N, mps"),
    ],
)
def test_unavailable_devices_are_clear_errors(monkeypatch: pytest.MonkeyPatch, name: str, message: str) -> None:
    _fake_cuda(monkeypatch, 0)
    _fake_mps(monkeypatch, False)
    with pytest.raises(DeviceError) as error:
        devices.resolve_device(name)
    assert error.value.message.startswith(message)


def test_precision_auto_follows_the_hardware(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch, 1, bf16=True)
    assert devices.resolve_precision("auto", torch.device("cuda")) == torch.bfloat16
    _fake_cuda(monkeypatch, 1, bf16=False)
    assert devices.resolve_precision("auto", torch.device("cuda")) == torch.float32
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    assert devices.resolve_precision("auto", torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    assert devices.resolve_precision("auto", torch.device("cpu")) == torch.float32
    assert devices.resolve_precision("auto", torch.device("mps")) == torch.float32


def test_only_bf16_on_a_cpu_without_bf16_instructions_counts_as_emulated(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    assert devices.is_emulated(torch.bfloat16, cpu)
    assert not devices.is_emulated(torch.float32, cpu) and not devices.is_emulated(torch.bfloat16, cuda)
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    assert not devices.is_emulated(torch.bfloat16, cpu)


def test_explicit_precisions() -> None:
    cpu = torch.device("cpu")
    assert devices.resolve_precision("fp32", cpu) == torch.float32
    assert devices.resolve_precision("BF16", cpu) == torch.bfloat16
    assert devices.resolve_precision("fp16", torch.device("cuda")) == torch.float16
    with pytest.raises(DeviceError, match="--precision fp16 is for GPUs"):
        devices.resolve_precision("fp16", cpu)
    with pytest.raises(DeviceError, match="--precision int8: expected auto, fp32, bf16, fp16"):
        devices.resolve_precision("int8", cpu)


def test_out_of_memory_errors_are_recognised() -> None:
    assert devices.is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert devices.is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate"))
    assert not devices.is_out_of_memory(RuntimeError("shape mismatch"))
    assert not devices.is_out_of_memory(ValueError("out of memory"))


_REUSE_PROBE = """
import resource, sys, torch
from mprnet_cli import devices
if sys.argv[1] == "keep" and not devices.keep_freed_host_memory():
    sys.exit("not kept")
image = torch.ones(1, 16, 1024, 640)  # 40 MiB float32 maps: over glibc's 32 MiB mmap limit
for round in range(20):
    if round == 10:  # the heap grows for a few rounds (aligned blocks fragment it), then settles
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    features = image + 1
    for _ in range(3):
        features = features * 2  # a new map while the last is alive, then the last is freed
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
held = devices.kept_free_bytes()
del features
print(devices.kept_free_bytes() - held, faults)
"""


@pytest.mark.skipif(devices._glibc() is None, reason="glibc's malloc only")
def test_freed_host_memory_is_reused_without_page_faults_and_counted_as_available() -> None:
    def run(mode: str) -> tuple[int, int]:
        done = subprocess.run([sys.executable, "-c", _REUSE_PROBE, mode], capture_output=True, text=True, check=False)
        if done.stderr.strip() == "not kept":
            pytest.skip("this glibc refused the settings")
        assert done.returncode == 0, done.stderr
        freed, faults = map(int, done.stdout.split())
        return freed, faults

    freed, faults = run("default")
    assert faults > 10 * 4 * (40 << 20) // 4096 // 2  # each map's pages are faulted in anew
    assert freed < (1 << 20)  # unmapped at once: nothing kept
    freed, faults = run("keep")
    assert faults <= 2 * (40 << 20) // 4096  # the heap may still grow by a map once: not 40 maps
    assert freed >= 39 << 20  # the freed 40 MiB map is kept, and counted


_RELEASE_PROBE = """
import sys, torch
from mprnet_cli import devices
if not devices.keep_freed_host_memory():
    sys.exit("not kept")
def resident() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096
hole = torch.ones(100 << 20, dtype=torch.uint8)  # touched: resident
above = torch.ones(1 << 20, dtype=torch.uint8)  # keeps the hole off the top of the heap
del hole
kept = resident()
devices.release_freed_host_memory()
print(kept - resident())
"""


@pytest.mark.skipif(devices._glibc() is None, reason="glibc's malloc only")
def test_released_memory_leaves_the_resident_set_even_from_inside_the_heap() -> None:
    done = subprocess.run([sys.executable, "-c", _RELEASE_PROBE], capture_output=True, text=True, check=False)
    if done.stderr.strip() == "not kept":
        pytest.skip("this glibc refused the settings")
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) >= 95 << 20  # the 100 MiB hole, less a few pages


def test_available_ram_adds_what_malloc_keeps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "_kernel_available_ram", lambda: 1000)
    monkeypatch.setattr(devices, "kept_free_bytes", lambda: 24)
    assert devices.available_ram() == 1024
    assert devices.memory_budget(torch.device("cpu")) == devices.MEMORY_SHARE["cpu"] * 1024


def test_nothing_is_changed_without_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "_glibc", lambda: None)
    assert devices.keep_freed_host_memory() is False
    assert devices.kept_free_bytes() == 0
    devices.release_freed_host_memory()  # does nothing, and does not fail
