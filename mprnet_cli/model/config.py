"""Hyper-parameters of one MPRNet, the three published presets, and reading them back
from a state dict's tensor shapes (so any width, fine-tuned or tiny, loads)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class MPRNetConfig:
    n_feat: int = 96
    scale_unetfeats: int = 48
    scale_orsnetfeats: int = 32
    num_cab: int = 8
    kernel_size: int = 3
    reduction: int = 4
    bias: bool = False
    in_c: int = 3
    out_c: int = 3

    @property
    def unet_widths(self) -> tuple[int, int, int]:
        """Channel widths of the three U-Net levels (each level adds `scale_unetfeats`)."""
        return (self.n_feat, self.n_feat + self.scale_unetfeats, self.n_feat + 2 * self.scale_unetfeats)

    @property
    def orsnet_width(self) -> int:
        return self.n_feat + self.scale_orsnetfeats

    @property
    def widths(self) -> tuple[int, int, int]:
        """The triple that tells the published checkpoints apart."""
        return (self.n_feat, self.scale_unetfeats, self.scale_orsnetfeats)


#: The authors' published configurations, one per task (swz30/MPRNet).
TASK_CONFIGS: dict[str, MPRNetConfig] = {
    "deblur": MPRNetConfig(n_feat=96, scale_unetfeats=48, scale_orsnetfeats=32),
    "derain": MPRNetConfig(n_feat=40, scale_unetfeats=20, scale_orsnetfeats=16),
    "denoise": MPRNetConfig(n_feat=80, scale_unetfeats=48, scale_orsnetfeats=32),
}

TASKS: tuple[str, ...] = tuple(TASK_CONFIGS)


def task_with_widths(config: MPRNetConfig) -> str | None:
    """The published task whose widths `config` has exactly, if any."""
    for task, preset in TASK_CONFIGS.items():
        if preset.widths == config.widths:
            return task
    return None


_ORB_CONV = re.compile(r"stage3_orsnet\.orb1\.body\.(\d+)\.weight$")


def infer_config(state_dict: Mapping[str, Tensor]) -> MPRNetConfig:
    """Read the hyper-parameters off the tensor shapes.

    Raises KeyError when a tensor this needs is absent: the caller turns that into a
    message about the file.
    """
    first = state_dict["shallow_feat1.0.weight"]
    n_feat, in_c, kernel_size = first.shape[0], first.shape[1], first.shape[2]
    attention_hidden = state_dict["shallow_feat1.1.CA.conv_du.0.weight"].shape[0]
    # ORB bodies hold num_cab blocks then one plain convolution, whose index is num_cab.
    orb_indices = [int(m.group(1)) for key in state_dict if (m := _ORB_CONV.match(key))]
    if not orb_indices:
        raise KeyError("stage3_orsnet.orb1.body.<n>.weight")
    return MPRNetConfig(
        n_feat=n_feat,
        scale_unetfeats=state_dict["stage1_encoder.down12.down.1.weight"].shape[0] - n_feat,
        scale_orsnetfeats=state_dict["concat23.weight"].shape[0] - n_feat,
        num_cab=max(orb_indices),
        kernel_size=kernel_size,
        reduction=max(1, n_feat // max(1, attention_hidden)),
        bias="shallow_feat1.0.bias" in state_dict,
        in_c=in_c,
        out_c=state_dict["tail.weight"].shape[0],
    )
