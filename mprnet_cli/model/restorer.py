"""`Restorer`: load a network once, restore many images.

The published inference recipe lives here and only here: pixels to float in [0, 1],
reflect-pad bottom and right to a multiple of 8, run, keep the stage-3 image, crop,
clamp. Grayscale and alpha are handled around it so the network always sees RGB.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, overload

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mprnet_cli.devices import resolve_device, resolve_precision
from mprnet_cli.model.network import SIZE_MULTIPLE, MPRNet

if TYPE_CHECKING:
    from PIL import Image


def pad_to_multiple(x: Tensor, multiple: int = SIZE_MULTIPLE) -> Tensor:
    """Reflect-pad bottom and right up to the next multiple (the published recipe).

    Reflection needs the pad to be shorter than the side, so sides under `multiple`
    reflect repeatedly, and a one-pixel side, which has nothing to reflect, repeats.
    """
    pad_h = -x.shape[-2] % multiple
    pad_w = -x.shape[-1] % multiple
    while pad_h or pad_w:
        step_h = min(pad_h, x.shape[-2] - 1)
        step_w = min(pad_w, x.shape[-1] - 1)
        if not step_h and not step_w:
            return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        x = F.pad(x, (0, step_w, 0, step_h), mode="reflect")
        pad_h, pad_w = pad_h - step_h, pad_w - step_w
    return x


_INTEGER_SCALE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}


class Restorer:
    """An MPRNet on a device, ready to restore images of any size.

    `restore` takes and returns numpy arrays (HxW, HxWx1, HxWx2, HxWx3 or HxWx4; uint8,
    uint16 or float in [0, 1]) or PIL images, keeping dtype, mode and alpha.
    """

    def __init__(self, model: MPRNet, *, device: str | torch.device = "auto", precision: str = "fp32") -> None:
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.dtype = resolve_precision(precision, self.device)
        self.model = model.eval().to(device=self.device, dtype=self.dtype)

    @classmethod
    def from_checkpoint(cls, path: str | Path, task: str | None = None, **options: object) -> Restorer:
        """Load a checkpoint file (see `mprnet_cli.checkpoints`); `task` refuses another task's file."""
        from mprnet_cli.checkpoints import load_model

        return cls(load_model(Path(path), task), **options)  # type: ignore[arg-type]

    @torch.inference_mode()
    def restore_tensor(self, image: Tensor) -> Tensor:
        """Restore a float RGB batch (Bx3xHxW in [0, 1], any device); the result is float32 on the CPU."""
        height, width = image.shape[-2:]
        padded = pad_to_multiple(image.to(device=self.device, dtype=self.dtype))
        restored = self.model(padded)[0][..., :height, :width]
        return restored.float().clamp_(0.0, 1.0).cpu()

    @overload
    def restore(self, image: np.ndarray) -> np.ndarray: ...
    @overload
    def restore(self, image: Image.Image) -> Image.Image: ...

    def restore(self, image: np.ndarray | Image.Image) -> np.ndarray | Image.Image:
        if isinstance(image, np.ndarray):
            return self.restore_array(image)
        from PIL import Image

        if isinstance(image, Image.Image):
            return self._restore_pil(image)
        raise TypeError(f"expected a numpy array or a PIL image, got {type(image).__name__}")

    def restore_array(self, array: np.ndarray) -> np.ndarray:
        color, alpha = split_alpha(array)
        restored = self.restore_tensor(array_to_tensor(color))
        return join_alpha(tensor_to_array(restored, like=color), alpha)

    def _restore_pil(self, image: Image.Image) -> Image.Image:
        from PIL import Image

        mode = image.mode
        if mode not in ("L", "LA", "RGB", "RGBA", "I;16"):
            mode = "RGBA" if "A" in image.getbands() or "transparency" in image.info else "RGB"
            image = image.convert(mode)
        restored = self.restore_array(np.asarray(image))
        return Image.fromarray(restored)


def split_alpha(array: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Separate colour (HxW or HxWx3) from alpha; alpha is not restored, only carried."""
    channels = 1 if array.ndim == 2 else array.shape[2] if array.ndim == 3 else 0
    if channels == 1:
        return array.reshape(array.shape[:2]), None
    if channels == 2:
        return array[..., 0], array[..., 1]
    if channels == 3:
        return array, None
    if channels == 4:
        return array[..., :3], array[..., 3]
    raise ValueError(f"expected an HxW, HxWx1, HxWx2, HxWx3 or HxWx4 image, got shape {array.shape}")


def join_alpha(color: np.ndarray, alpha: np.ndarray | None) -> np.ndarray:
    if alpha is None:
        return color
    if color.ndim == 2:
        return np.stack([color, alpha], axis=-1)
    return np.concatenate([color, alpha[..., None]], axis=-1)


def array_to_tensor(color: np.ndarray) -> Tensor:
    """HxW (gray, repeated to RGB) or HxWx3 pixels to a 1x3xHxW float tensor in [0, 1]."""
    scale = _INTEGER_SCALE.get(color.dtype)
    if scale is None and not np.issubdtype(color.dtype, np.floating):
        raise ValueError(f"expected uint8, uint16 or float pixels, got {color.dtype}")
    tensor = torch.from_numpy(np.array(color, dtype=np.float32))  # a writable float copy
    if scale is not None:
        tensor /= scale
    tensor = tensor[None, None].expand(1, 3, *color.shape) if color.ndim == 2 else tensor.permute(2, 0, 1)[None]
    return tensor.contiguous()


def tensor_to_array(tensor: Tensor, like: np.ndarray) -> np.ndarray:
    """Inverse of `array_to_tensor`: same dtype and layout as `like` (gray is the channel mean)."""
    pixels = tensor[0].mean(dim=0) if like.ndim == 2 else tensor[0].permute(1, 2, 0)
    scale = _INTEGER_SCALE.get(like.dtype)
    if scale is None:
        return pixels.numpy().astype(like.dtype, copy=False)
    return torch.round(pixels * scale).numpy().astype(like.dtype)
