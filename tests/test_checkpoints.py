"""Checkpoint files as published and as users have them, and every way they can be wrong."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mprnet_cli.checkpoints import build_model, load_model, read_state_dict
from mprnet_cli.errors import CheckpointError
from mprnet_cli.model.config import TASK_CONFIGS
from mprnet_cli.model.network import MPRNet

from .conftest import TINY_CHECKPOINT


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    return read_state_dict(TINY_CHECKPOINT)


def _assert_same_weights(model: MPRNet, state: dict[str, torch.Tensor]) -> None:
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[key], state[key]) for key in state)


def test_authors_format_with_dataparallel_prefix_loads(tiny_state: dict[str, torch.Tensor]) -> None:
    raw = torch.load(TINY_CHECKPOINT, weights_only=True)
    assert set(raw) == {"epoch", "state_dict"} and all(k.startswith("module.") for k in raw["state_dict"])
    _assert_same_weights(load_model(TINY_CHECKPOINT, task="deblur"), tiny_state)


def test_training_checkpoint_with_optimizer_state_loads(tmp_path: Path, tiny_state: dict[str, torch.Tensor]) -> None:
    optimizer = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}}, "param_groups": [{"lr": 1e-4}]}
    path = tmp_path / "model_deblurring.pth"
    torch.save({"epoch": 3000, "state_dict": OrderedDict(tiny_state), "optimizer": optimizer}, path)
    _assert_same_weights(load_model(path), tiny_state)


def test_bare_state_dict_loads(tmp_path: Path, tiny_state: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "bare.pth"
    torch.save(tiny_state, path)
    _assert_same_weights(load_model(path), tiny_state)


def test_safetensors_loads(tmp_path: Path, tiny_state: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "model.safetensors"
    # The shared PReLU makes several keys alias one tensor; safetensors wants them separate.
    save_file({k: v.clone() for k, v in tiny_state.items()}, str(path))
    _assert_same_weights(load_model(path), tiny_state)


class NeedsCode:
    """A class a checkpoint can only hold by pickling code references."""


def test_pickle_that_needs_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "extra": NeedsCode()}, path)
    with pytest.raises(CheckpointError, match="needs arbitrary code to load, which mprnet refuses"):
        read_state_dict(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.pth"):
        read_state_dict(tmp_path / "nope.pth")


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="is a directory"):
        read_state_dict(tmp_path)


def test_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "cut.pth"
    path.write_bytes(TINY_CHECKPOINT.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_state_dict(path)


@pytest.mark.parametrize(
    "content",
    [b"", b"not a checkpoint at all\n", b"\x89PNG\r\n\x1a\n" + bytes(64),
     # Text whose first byte is a pickle opcode: a memo lookup (KeyError), a pop from the
     # empty stack (IndexError), a 4-byte length cut short (struct.error).
     b"hello world\n", b"all good\n", b"J\x00"],
)
def test_not_a_checkpoint(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "x.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint|truncated or corrupt"):
        read_state_dict(path)


def test_corrupt_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="not a readable .safetensors file"):
        read_state_dict(path)


def test_checkpoint_without_tensors(tmp_path: Path) -> None:
    path = tmp_path / "empty.pth"
    torch.save({"epoch": 1, "state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="holds no state dict"):
        read_state_dict(path)


def test_another_architecture_is_refused() -> None:
    state = {"conv.weight": torch.zeros(8, 3, 3, 3)}
    with pytest.raises(CheckpointError, match=r"is not an MPRNet checkpoint \(no tensor 'shallow_feat1.0.weight'\)"):
        build_model(state, "resnet.pth")


def test_missing_unexpected_and_misshapen_tensors_are_named(tiny_state: dict[str, torch.Tensor]) -> None:
    state = dict(tiny_state)
    del state["sam12.conv1.weight"]
    state["tail.weight"] = torch.zeros(3, 20, 3, 3)
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as error:
        build_model(state, "odd.pth")
    assert error.value.message == (
        "odd.pth does not match the MPRNet architecture (n_feat=16, scale_unetfeats=8, scale_orsnetfeats=8): "
        "tensors 1 missing (e.g. sam12.conv1.weight); 1 unexpected (e.g. extra.weight); "
        "1 of the wrong shape (e.g. tail.weight: (3, 20, 3, 3), expected (3, 24, 3, 3))"
    )


@pytest.mark.parametrize(("published", "asked"), [("derain", "deblur"), ("deblur", "denoise"), ("denoise", "derain")])
def test_another_tasks_checkpoint_names_the_right_command(published: str, asked: str) -> None:
    with torch.device("meta"):
        state = MPRNet(TASK_CONFIGS[published]).state_dict()
    with pytest.raises(CheckpointError) as error:
        build_model(state, "model.pth", task=asked)
    assert error.value.message == f"model.pth looks like a {published} checkpoint: run `mprnet {published}`, not `mprnet {asked}`"
    assert error.value.exit_code == 2


def test_tiny_model_loads_for_any_task(tiny_state: dict[str, torch.Tensor]) -> None:
    for task in TASK_CONFIGS:
        assert build_model(tiny_state, "tiny.pth", task=task).config.n_feat == 16
    with pytest.raises(ValueError, match="unknown task 'sharpen': expected one of deblur, derain, denoise"):
        build_model(tiny_state, "tiny.pth", task="sharpen")
