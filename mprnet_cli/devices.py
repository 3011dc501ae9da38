"""Which device and which number format to run on, decided once, with clear errors."""

from __future__ import annotations

import os

import torch

from mprnet_cli.errors import DeviceError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend and backend.is_available())


def resolve_device(name: str) -> torch.device:
    """`auto` prefers CUDA, then Apple's MPS, then the CPU; a named device must exist."""
    name = name.strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not _mps_available():
            raise DeviceError("--device mps: Apple's MPS backend is not available on this machine")
        return torch.device("mps")
    if name == "cuda" or name.startswith("cuda:"):
        index_text = name.partition(":")[2]
        if index_text and not index_text.isdigit():
            raise DeviceError(f"--device {name}: expected cuda or cuda:N with N a GPU number")
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: no CUDA GPU is available (this PyTorch build or machine has none)")
        count = torch.cuda.device_count()
        index = int(index_text) if index_text else 0
        if index >= count:
            raise DeviceError(f"--device {name}: only {count} CUDA device(s) here (cuda:0 to cuda:{count - 1})")
        return torch.device("cuda", index)
    raise DeviceError(f"--device {name}: expected one of {', '.join(DEVICE_CHOICES)}")


def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 dot-product instructions (AVX-512 BF16 or AMX), where
    oneDNN runs bf16 convolutions about twice as fast as fp32."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 where the hardware computes it natively, fp32 (the exact reference) elsewhere."""
    name = name.strip().lower()
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if device.type == "cpu" and cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    if name not in PRECISIONS:
        raise DeviceError(f"--precision {name}: expected auto, {', '.join(PRECISIONS)}")
    if name == "fp16" and device.type == "cpu":
        raise DeviceError("--precision fp16 is for GPUs; on the CPU use bf16 or fp32")
    return PRECISIONS[name]


#: Share of the free memory a forward may plan to use; the rest is left for the
#: accumulator, the decode/encode threads and everything else on the machine.
MEMORY_SHARE = {"cuda": 0.8, "cpu": 0.5}


def memory_budget(device: torch.device) -> float:
    """Bytes a forward may use now: free GPU memory on CUDA, available RAM elsewhere
    (Apple's MPS shares the machine's RAM)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return MEMORY_SHARE["cuda"] * free
    return MEMORY_SHARE["cpu"] * available_ram()


def available_ram() -> int:
    """MemAvailable on Linux (what the kernel can hand out without swapping), else free pages."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def is_out_of_memory(error: BaseException) -> bool:
    """Both CUDA's dedicated error and the allocators' RuntimeError wording count."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
