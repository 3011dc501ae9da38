"""Which shapes keep a CUDA graph, and what each forward then takes.

`speed.py` gives one median per process; this times every forward of one `Restorer`,
with and without graphs, and prints the decision that `MPRNET_DEBUG=1` would show, for
three fresh restorers per case: a decision rests on one timed eager forward and one
timed replay, so it is worth seeing whether it comes out the same each time.

    python benchmarks/cuda_graphs.py [--tasks derain deblur] [--size 512]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

from mprnet_cli.model.config import TASK_CONFIGS
from mprnet_cli.model.network import MPRNet
from mprnet_cli.model.restorer import Restorer

FORWARDS = 25
#: The first forwards are left out of the median: cuDNN tries kernels on the first, and
#: the graph is captured on the second.
SETTLED = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["deblur", "derain"], choices=sorted(TASK_CONFIGS))
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--tries", type=int, default=3)
    arguments = parser.parse_args()
    if not torch.cuda.is_available():
        parser.exit(1, "cuda_graphs.py: needs a CUDA GPU\n")
    logging.basicConfig(format="  %(message)s")
    logging.getLogger("mprnet").setLevel(logging.DEBUG)
    image = torch.rand(1, 3, arguments.size, arguments.size)
    for task in arguments.tasks:
        for attempt in range(arguments.tries):
            for graphs in (False, True):
                torch.manual_seed(0)
                restorer = Restorer(MPRNet(TASK_CONFIGS[task]), device="cuda", precision="auto", cuda_graphs=graphs)
                times = []
                for _ in range(FORWARDS):
                    torch.cuda.synchronize()
                    started = time.perf_counter()
                    restorer.restore_tensor(image)
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - started)
                print(f"{task} {arguments.size}x{arguments.size} try {attempt + 1} {'graphs' if graphs else 'eager'}:"
                      f" first forwards {', '.join(f'{t * 1e3:.1f}' for t in times[:SETTLED])} ms;"
                      f" median of the next {FORWARDS - SETTLED}: {statistics.median(times[SETTLED:]) * 1e3:.1f} ms",
                      flush=True)
                del restorer
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
