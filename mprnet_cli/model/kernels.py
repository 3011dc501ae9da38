"""TLC's channel attention as one compiled pass over the map, on the CPU.

Taken as whole-tensor operations, TLC's gate is written out at the map's size and read
back to apply it, and its local means take a dozen passes: derain at 1920x1080 in bf16
spent 3.4 s more a forward than with global means (+12%), 1.4 s of it in the second
convolution, its sigmoid and the dearer apply alone (docs/quality.md). `tlc_kernel.c`
takes the means, the gate and the apply a gate row at a time, in cache.

The source ships with the package and is compiled on first use with the machine's C
compiler (`$CC`, else `cc`) for the machine's own vector instructions, with OpenMP, into
the user's cache; where there is no compiler, or it fails, TLC runs as the whole-tensor
operations of `network` instead, to the same results but for rounding.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

logger = logging.getLogger("mprnet")

SOURCE = Path(__file__).with_name("tlc_kernel.c")
#: -fno-trapping-math lets the compiler vectorise the sigmoid's clamps and rounding.
FLAGS = ("-O3", "-march=native", "-fno-trapping-math", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC")
LANES = 16  # the kernel's vector width in fp32 values: C is padded to a multiple of it
FUNCTIONS = {torch.bfloat16: "mprnet_tlc_bf16", torch.float32: "mprnet_tlc_fp32"}


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mprnet" / "kernels"


def _cpu_flags() -> str:
    """The CPU's instruction sets: a library built with -march=native runs only on CPUs
    that have them, and a home folder may be shared by the nodes of a cluster."""
    try:
        with open("/proc/cpuinfo") as info:
            return next((line for line in info if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def c_compiler() -> list[str]:
    """The command that builds the kernel: `$CC` (with any flags in it), else `cc`."""
    return shlex.split(os.environ.get("CC") or "cc")


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel, built on first use (about a second) and kept in `cache_dir()`
    under a name that changes with the source, the compiler, its flags and the CPU; None
    where it cannot be built or loaded, or with MPRNET_TLC_KERNEL=0 (why is logged for
    MPRNET_DEBUG)."""
    if os.environ.get("MPRNET_TLC_KERNEL") == "0":
        logger.debug("TLC runs as tensor operations: MPRNET_TLC_KERNEL=0")
        return None
    compiler = c_compiler()
    if not compiler or shutil.which(compiler[0]) is None:
        logger.debug("TLC runs as tensor operations: no C compiler (%s) to build its kernel", " ".join(compiler))
        return None
    target = library_path(compiler)
    try:
        if target.exists():
            try:
                return _load(target)
            except (OSError, AttributeError) as error:  # damaged (a crash mid-copy, a full disk): rebuilt
                logger.debug("rebuilding TLC's kernel: %s", error)
        _build(compiler, target)
        return _load(target)
    except subprocess.CalledProcessError as error:
        logger.debug("TLC runs as tensor operations: its kernel did not compile: %s",
                     error.stderr.decode(errors="replace").strip()[-2000:])
    except (OSError, AttributeError, subprocess.SubprocessError) as error:
        logger.debug("TLC runs as tensor operations: its kernel could not be built or loaded: %s", error)
    return None


def library_path(compiler: list[str]) -> Path:
    """Where the library built by `compiler` lives: named for the source, the compiler, its
    flags and the CPU, so that none of them can change without a rebuild."""
    key = "\0".join([SOURCE.read_text(), *compiler, *FLAGS, platform.machine(), _cpu_flags()])
    return cache_dir() / f"tlc-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"


def _build(compiler: list[str], target: Path) -> None:
    """Compile into a temporary file beside `target`, then rename it into place, so that a
    process that loads `target` never finds half a library."""
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(descriptor)
    try:
        subprocess.run([*compiler, *FLAGS, "-o", partial, str(SOURCE)], check=True, capture_output=True, timeout=120)
        os.replace(partial, target)
    finally:
        Path(partial).unlink(missing_ok=True)


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name in FUNCTIONS.values():
        function = getattr(lib, name)
        function.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 8
        function.restype = ctypes.c_int
    return lib


def applies(x: Tensor, residual: Tensor) -> bool:
    """True where the kernel can take these maps: CPU tensors of one dtype it knows, laid
    out channels-last without gaps, and the kernel built."""
    return (x.device.type == "cpu" and x.dtype in FUNCTIONS and residual.dtype == x.dtype
            and residual.shape == x.shape
            and all(t.is_contiguous(memory_format=torch.channels_last) for t in (x, residual))
            and library() is not None)


def local_gate_and_add(x: Tensor, residual: Tensor, reduced: Tensor, up: torch.nn.Conv2d,
                       window: tuple[int, int]) -> Tensor:
    """`x * gate + residual`, written into `x`, for TLC's gate of `x` (`ChannelAttention`):
    `reduced` is `x` after the gate's first convolution, `up` its second, before the
    sigmoid. Each image's gate rows are split among PyTorch's threads."""
    batch, channels, height, width = x.shape
    window_height, window_width = min(window[0], height), min(window[1], width)
    count = reduced.shape[1]
    padded = -(-channels // LANES) * LANES
    weight = torch.zeros(count, padded)
    weight[:, :channels] = up.weight.detach().reshape(channels, count).t()
    bias = torch.zeros(padded)
    if up.bias is not None:
        bias[:channels] = up.bias.detach()
    function = getattr(library(), FUNCTIONS[x.dtype])
    failed = function(reduced.data_ptr(), x.data_ptr(), residual.data_ptr(), weight.data_ptr(), bias.data_ptr(),
                      batch, height, width, count, channels, padded, window_height, window_width)
    if failed:  # worded as PyTorch's CPU allocator words it, so the restorer retries in smaller tiles
        raise RuntimeError("TLC's kernel can't allocate memory for its row buffers")
    return x
