"""Speed and peak memory of MPRNet on this machine: the published recipe against ours.

Variants, each timed in a fresh process (peak RSS is a high-water mark), interleaved
round by round because shared machines drift:

- published: what the authors' demo does: fp32, NCHW, `torch.no_grad`, the whole image
  reflect-padded to a multiple of 8, through the authors' forward step for step
  (`published.py`, on our modules' weights): their memory and call pattern;
- default: `mprnet`'s default path (`--precision auto`, `--tile auto`): bf16 where the
  CPU has native bf16, channels-last, `torch.inference_mode`, tiles when the image is
  larger than the CPU tile cap; on CUDA, repeated shapes replayed from a CUDA graph where
  that measured faster (the timed runs repeat one shape);
- eager (CUDA only): the default path with every forward run eagerly, no CUDA graphs,
  asked for by name only;
- fp32: the same path in `--precision fp32`, the exact reference;
- bf16: the same path in `--precision bf16`, asked for by name only: on a CPU without
  bf16 instructions, what forcing it costs;
- compiled: the default path with the network put through `torch.compile` (Inductor,
  weights frozen into the graph), asked for by name only: compiling takes 20 to 70 s
  here, shown as the first run. It is what a fixed-shape compiled fast path would gain;
- onnxruntime: the network exported to ONNX and run by ONNX Runtime (fp32), only when
  the `onnxruntime` package is installed (not a dependency of the tool);
- openvino: the network converted by OpenVINO and compiled for its CPU plugin in bf16
  (`INFERENCE_PRECISION_HINT`), only when the `openvino` package is installed.

Memory: peak RSS of the whole process, and the forward's share of it per megapixel (peak
minus the RSS before the first forward: the model and imports excluded). With `--device
cuda`, the same from `torch.cuda.max_memory_allocated` instead of RSS, and the CPU
runtimes (onnxruntime, openvino) are left out; the peak leaves out the first call, on
which cuDNN tries kernels with whatever workspace they ask for (gigabytes in fp32), and
counts the second, on which the default path tries a CUDA graph: a kept graph holds the
memory of its capture, and its replays allocate nothing. On CUDA,
*published* runs with PyTorch's defaults, as the authors' demo does: cuDNN may use TF32
for its fp32 convolutions, while `mprnet --precision fp32` does not (the exact
reference). *compiled* adds CUDA graphs there.

Seeded random weights: speed does not depend on their values. GFLOP/s counts the
published network's FLOPs for the image itself (torch's FLOP counter, 2 per multiply-add),
for every variant alike: not the extra work of tile overlaps, so tiling overhead shows as
a lower rate, nor the 4% fewer that our forward does (1x1 convolutions folded, pairs of
convolutions run as one), so that saving shows as a higher one.

    python benchmarks/speed.py                                   # derain and deblur, 256 and 512
    python benchmarks/speed.py --tasks derain --sizes 1920x1080 --variants default fp32
    python benchmarks/speed.py --variants default compiled
    python benchmarks/speed.py --device cuda --sizes 512 1920x1080 --repeats 5
    python benchmarks/speed.py --device cuda --sizes 256 512 --variants eager default --repeats 20
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections import defaultdict

from memory import current_rss  # benchmarks/ is on the path when a script here runs
from published import authors_forward

#: TFLOP per megapixel, measured with torch's FLOP counter on 256x256 (shared/reference).
TFLOP_PER_MEGAPIXEL = {"deblur": 23.2, "derain": 4.3, "denoise": 17.5}
VARIANTS = ("published", "default", "fp32", "bf16", "onnxruntime", "openvino", "compiled", "eager")
#: Asked for by name only.
ON_REQUEST = ("bf16", "compiled", "eager")
#: Other runtimes: their peak RSS is that of converting the model, so no forward share is shown.
PEERS = ("onnxruntime", "openvino")


def _size(text: str) -> tuple[int, int]:
    width, _, height = text.partition("x")
    return (int(height or width), int(width))


def _image(height: int, width: int):  # noqa: ANN202 - numpy is imported in the worker only
    import numpy as np

    return np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _padded(image):  # noqa: ANN001, ANN202
    """The image as the authors' demo feeds it: a float NCHW tensor reflect-padded to a multiple of 8."""
    from mprnet_cli.model.restorer import array_to_tensor, pad_to_multiple

    return pad_to_multiple(array_to_tensor(image))


def _published(model, image, device: str):  # noqa: ANN001, ANN202
    import torch

    model = model.float().eval().to(device)
    height, width = image.shape[:2]

    def run() -> None:
        with torch.no_grad():
            authors_forward(model, _padded(image).to(device))[0][..., :height, :width].clamp(0, 1).cpu()

    return run


def _ours(model, image, precision: str, device: str, variant: str = "default"):  # noqa: ANN001, ANN202
    import torch

    from mprnet_cli.model.restorer import Restorer

    restorer = Restorer(model, device=device, precision=precision, cuda_graphs=variant not in ("eager", "compiled"))
    if variant == "compiled":
        options = {"freezing": True, "triton.cudagraphs": restorer.device.type == "cuda"}
        restorer.model = torch.compile(restorer.model, dynamic=False, options=options)
    return lambda: restorer.restore(image)


def _onnxruntime(model, image):  # noqa: ANN001, ANN202
    import io

    import onnxruntime
    import torch

    padded = _padded(image)
    buffer = io.BytesIO()
    torch.onnx.export(model.float().eval(), (padded,), buffer, input_names=["image"], dynamo=False)
    session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    feed = {"image": padded.numpy()}
    return lambda: session.run(None, feed)


def _openvino(model, image):  # noqa: ANN001, ANN202
    import openvino
    import torch

    padded = _padded(image)
    with torch.no_grad():
        converted = openvino.convert_model(model.float().eval(), example_input=padded)
    compiled = openvino.Core().compile_model(converted, "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})
    request = compiled.create_infer_request()
    feed = padded.numpy()
    return lambda: request.infer([feed])


def run_worker(task: str, size: str, variant: str, repeats: int, device: str) -> dict[str, object]:
    import torch

    from mprnet_cli.model.config import TASK_CONFIGS
    from mprnet_cli.model.network import MPRNet

    torch.manual_seed(0)
    model = MPRNet(TASK_CONFIGS[task])
    height, width = _size(size)
    image = _image(height, width)
    if variant == "published":
        run = _published(model, image, device)
    elif variant == "onnxruntime":
        run = _onnxruntime(model, image)
    elif variant == "openvino":
        run = _openvino(model, image)
    else:
        run = _ours(model, image, variant if variant in ("fp32", "bf16") else "auto", device, variant)
    cuda = device == "cuda"
    before = torch.cuda.memory_allocated() if cuda else current_rss()
    started = time.perf_counter()
    run()  # warm-up: oneDNN builds its kernels, and cuDNN picks its, on the first call of each shape
    first = time.perf_counter() - started
    if cuda:
        torch.cuda.reset_peak_memory_stats()  # cuDNN's trial workspaces are not the forward's memory
        run()  # the default path tries a CUDA graph on a shape's second call: a kept graph holds its
        # capture's memory while its replays allocate nothing, so the peak counts the capture
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"first": first, "seconds": seconds, "peak": peak, "forward": peak - before}


def _available(variant: str, device: str) -> bool:
    if variant == "eager":
        return device == "cuda"
    if variant not in PEERS:
        return True
    if device == "cuda":  # CPU runtimes
        return False
    try:
        importlib.import_module(variant)
    except ImportError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["derain", "deblur"], choices=sorted(TFLOP_PER_MEGAPIXEL))
    parser.add_argument("--sizes", nargs="+", default=["256", "512"], help="N or WIDTHxHEIGHT")
    parser.add_argument("--variants", nargs="+", default=[v for v in VARIANTS if v not in ON_REQUEST], choices=VARIANTS)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (each a fresh process per variant)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per process, after one warm-up")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.worker:
        task, size, variant, repeats, device = arguments.worker
        print(json.dumps(run_worker(task, size, variant, int(repeats), device)))
        return

    import torch

    device = arguments.device
    variants = [v for v in arguments.variants if _available(v, device)]
    machine = torch.cuda.get_device_name() if device == "cuda" else _cpu_name()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"{machine}; rounds {arguments.rounds}, repeats {arguments.repeats}", flush=True)
    results: dict[tuple[str, str, str], list[dict[str, object]]] = defaultdict(list)
    for _ in range(arguments.rounds):
        for task in arguments.tasks:
            for size in arguments.sizes:
                for variant in variants:
                    command = [sys.executable, __file__, "--worker", task, size, variant, str(arguments.repeats), device]
                    finished = subprocess.run(command, capture_output=True, text=True, check=False)
                    if finished.returncode != 0:
                        raise SystemExit(f"{task} {size} {variant} failed:\n{finished.stderr[-2000:]}")
                    results[task, size, variant].append(json.loads(finished.stdout))

    peak_column = "peak allocated" if device == "cuda" else "peak RSS"
    print(f"| task | size | variant | seconds | MP/s | GFLOP/s | vs published | {peak_column} | forward GB/MP | vs published "
          "| first run |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for task in arguments.tasks:
        for size in arguments.sizes:
            height, width = _size(size)
            megapixels = height * width / 1e6
            medians = {v: statistics.median(s for r in results[task, size, v] for s in r["seconds"]) for v in variants}
            forward = {v: max(r["forward"] for r in results[task, size, v]) / 1024**3 / megapixels for v in variants}
            for variant in variants:
                runs = results[task, size, variant]
                seconds = medians[variant]
                ratio = f"{medians['published'] / seconds:.2f}x" if "published" in medians else "-"
                peak = max(r["peak"] for r in runs) / 1024**3
                share, saved = f"{forward[variant]:.2f}", "-"
                if variant in PEERS:
                    share = "-"
                elif "published" in forward and variant != "published":
                    less = 1 - forward[variant] / forward["published"]
                    saved = f"{less:.0%} less" if less >= 0 else f"{-less:.0%} more"
                print(f"| {task} | {width}x{height} | {variant} | {seconds:.{2 if seconds >= 1 else 3}f} | "
                      f"{megapixels / seconds:.3f} | "
                      f"{TFLOP_PER_MEGAPIXEL[task] * megapixels / seconds * 1000:.0f} | {ratio} | {peak:.2f} GB | "
                      f"{share} | {saved} | {statistics.median(r['first'] for r in runs):.2f} s |")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


if __name__ == "__main__":
    main()
