"""Where a TLC forward's extra time goes: the seconds spent in each step of the channel
attentions, summed over one whole-image forward, plain and with TLC.

Each step is wrapped in a timer: the attention's gate and its apply together, and inside
them, for the tensor operations, the gate (with TLC its first convolution is the whole
gate less the rest), the means, the gate's convolutions after them, applying the gate;
with TLC's compiled kernel (mprnet_cli/model/kernels.py), the kernel, which takes the
means, the gate and its apply in one pass. MPRNET_TLC_KERNEL=0 times the tensor
operations. Random weights of the published widths, an 8-bit image, as `tlc_cost.py`. One
untimed forward of each first, then plain and TLC alternately, --rounds times.

    python benchmarks/tlc_profile.py [--task derain] [--size 512x512] [--rounds 2]

Run it under the shared CPU lock (flock /tmp/mprnet-cpu.lock ...).
"""

from __future__ import annotations

import argparse
import collections
import time
from collections.abc import Callable

import numpy as np
import torch

from mprnet_cli import Restorer
from mprnet_cli.model import kernels, network
from mprnet_cli.model.config import TASK_CONFIGS

STEPS = ("_spatial_mean", "local_mean", "_gate_and_add")
seconds: collections.Counter[str] = collections.Counter()


def timed(name: str, function: Callable[..., object]) -> Callable[..., object]:
    def run(*args: object, **kwargs: object) -> object:
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            seconds[name] += time.perf_counter() - started

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="derain", choices=sorted(TASK_CONFIGS))
    parser.add_argument("--size", default="512x512")
    parser.add_argument("--rounds", type=int, default=2)
    arguments = parser.parse_args()
    for name in STEPS:
        setattr(network, name, timed(name, getattr(network, name)))
    network.ChannelAttention._local_gate = timed("_local_gate", network.ChannelAttention._local_gate)
    network.ChannelAttention.forward = timed("attention", network.ChannelAttention.forward)
    network.ChannelAttention.gate_and_add = timed("gate_and_apply", network.ChannelAttention.gate_and_add)
    kernels.local_gate_and_add = timed("kernel", kernels.local_gate_and_add)
    torch.manual_seed(0)
    model = network.MPRNet(TASK_CONFIGS[arguments.task])
    restorers = {"plain": Restorer(model, device="cpu", precision="auto", tile=0),
                 "tlc": Restorer(model, device="cpu", precision="auto", tile=0, tlc_train_size=256)}
    height, width = map(int, arguments.size.split("x"))
    image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    for restorer in restorers.values():
        restorer.restore(image)
    for _ in range(arguments.rounds):
        gate_and_apply, totals = {}, {}
        for name, restorer in restorers.items():
            seconds.clear()
            started = time.perf_counter()
            restorer.restore(image)
            totals[name] = time.perf_counter() - started
            gate_and_apply[name] = seconds["gate_and_apply"]
            names = ("gate_and_apply", "attention", *STEPS, "_local_gate", "kernel")
            steps = ", ".join(f"{step.strip('_')} {seconds[step]:.3f}" for step in names if seconds[step])
            print(f"{arguments.task} {arguments.size} {name:>5}: {totals[name]:.2f} s; {steps}", flush=True)
        cost = gate_and_apply["tlc"] - gate_and_apply["plain"]
        print(f"  TLC's gate and apply cost {cost:+.3f} s, {100 * cost / totals['plain']:+.1f}% of the plain forward",
              flush=True)


if __name__ == "__main__":
    main()
