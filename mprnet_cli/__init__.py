"""mprnet: restore photos with MPRNet (deblur, derain, denoise) on images of any size.

The Python API: `Restorer.from_checkpoint(path, task)` loads once; `restore(image)` takes
numpy arrays or PIL images as many times as you like.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mprnet_cli.model.restorer import Restorer

__all__ = ["Restorer"]


def __getattr__(name: str) -> object:
    # Imported on first use so that `mprnet --help` does not pay for torch.
    if name == "Restorer":
        from mprnet_cli.model.restorer import Restorer

        return Restorer
    raise AttributeError(f"module 'mprnet_cli' has no attribute {name!r}")
