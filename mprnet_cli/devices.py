"""Which device and which number format to run on, decided once, with clear errors."""

from __future__ import annotations

import ctypes
import functools
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


def is_emulated(dtype: torch.dtype, device: torch.device) -> bool:
    """True for bf16 on a CPU without bf16 instructions, where PyTorch converts to and from
    fp32 around every operation: derain at 256x256 took 23.6 s there against 2.3 s in fp32
    (an AVX2 EPYC, 2 cores; `benchmarks/speed.py --variants default bf16`)."""
    return device.type == "cpu" and dtype == torch.bfloat16 and not cpu_has_native_bf16()


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
    """MemAvailable on Linux (what the kernel can hand out without swapping), else free
    pages; plus the freed memory malloc keeps for reuse, which the kernel counts as used."""
    return _kernel_available_ram() + kept_free_bytes()


def _kernel_available_ram() -> int:
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


#: mallopt() parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
#: As the trim threshold, -1 turns trimming off (mallopt(3)).
_TRIM_OFF = -1
#: Allocations up to this size come from the reusable heap; larger ones are still mapped.
_HEAP_ALLOCATION_LIMIT = 1 << 30


def keep_freed_host_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the OS.

    A forward allocates and frees hundreds of feature maps of tens of MB. By default glibc
    maps each one over 32 MB fresh and unmaps it on free, so every use is paid again in
    page faults while the kernel zeroes the pages: 1.2 million faults in a 15.8 s deblur
    forward at 512x512 in bf16 on the CPU. Kept on the heap, the memory is reused and the
    same forward runs in 14.2 s. The price is that the process's RSS stays at its peak
    until it exits, and that peak is up to about 2.6 times the live data, as aligned
    blocks fragment the heap (`available_ram` counts the kept memory as available).
    Process-wide and idempotent. False, with nothing changed, where the C library is not
    glibc; False too if glibc refused a setting.
    """
    libc = _glibc()
    if libc is None:
        return False
    trimming_off = libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_OFF)
    # Older glibc caps the mmap threshold at 32 MB; mapping nothing at all works there.
    on_heap = libc.mallopt(_M_MMAP_THRESHOLD, _HEAP_ALLOCATION_LIMIT) or libc.mallopt(_M_MMAP_MAX, 0)
    return bool(trimming_off and on_heap)


def release_freed_host_memory() -> None:
    """Hand the pages of the freed blocks that malloc keeps back to the OS (malloc_trim);
    a block that is reused later is faulted in again. Nothing happens without glibc.

    With freed memory kept (`keep_freed_host_memory`), the heap's resident size only grows,
    and aligned blocks fragment it: `Restorer` calls this once per input shape, before the
    network's full-resolution stage, so that stage does not stack its features on top of
    the resident holes that stages 1 and 2 left.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


class _MallocInfo(ctypes.Structure):
    """glibc's `struct mallinfo2`; `fordblks` is the freed memory malloc holds for reuse."""

    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def kept_free_bytes() -> int:
    """Memory this process has freed but malloc keeps (glibc 2.33 or newer; else 0). After
    `release_freed_host_memory` part of it is no longer resident, and counted twice by
    `available_ram`: at most the heap's free space, a small share of the budget."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return 0
    return int(libc.mallinfo2().fordblks)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library's handle where it is glibc, opened and typed once (tiles are sized
    per image)."""
    try:
        is_glibc = os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (AttributeError, ValueError, OSError):  # not POSIX, or not GNU
        return None
    if not is_glibc:
        return None
    libc = ctypes.CDLL(None)
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    if hasattr(libc, "mallinfo2"):  # glibc 2.33 or newer
        libc.mallinfo2.restype = _MallocInfo
    return libc
