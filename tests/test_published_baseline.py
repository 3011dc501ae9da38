"""benchmarks/published.py, the baseline of the speed table, is the authors' forward."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from mprnet_cli.checkpoints import load_model

from .conftest import PARITY, TINY_CHECKPOINT

_SPEC = importlib.util.spec_from_file_location("published", Path(__file__).parents[1] / "benchmarks" / "published.py")
published = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(published)


@pytest.mark.parametrize("size", ["64x48", "61x45"])
def test_the_baseline_reproduces_the_authors_outputs(size: str) -> None:
    expected = np.load(PARITY / f"expected_{size}.npz")
    with torch.no_grad():
        outputs = published.authors_forward(load_model(TINY_CHECKPOINT), torch.from_numpy(expected["padded_input"])[None])
    for name, output in zip(("stage3", "stage2", "stage1"), outputs):
        np.testing.assert_allclose(output[0].numpy(), expected[name], atol=1e-6, rtol=0)
