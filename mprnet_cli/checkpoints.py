"""Read MPRNet checkpoint files as the authors published them, and build the network.

Accepted: the authors' `{"state_dict": ..., "epoch": ..., "optimizer": ...}` pickles (with
or without the `module.` prefix that `nn.DataParallel` adds), a bare state dict, and
`.safetensors`. Pickles are only ever opened with `weights_only=True`, so a file that
needs arbitrary code to load is refused rather than run.
"""

from __future__ import annotations

import pickle
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from mprnet_cli.errors import CheckpointError
from mprnet_cli.model.config import TASK_CONFIGS, MPRNetConfig, infer_config, task_with_widths
from mprnet_cli.model.network import MPRNet

_WRAPPER_KEYS = ("state_dict", "params", "params_ema", "model")


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """Load the tensors of a checkpoint file, unwrapped and with `module.` stripped."""
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"checkpoint is a directory, not a file: {path}")
    if path.suffix == ".safetensors":
        loaded = _read_safetensors(path)
    else:
        loaded = _read_pickle(path)
    return _canonicalize(loaded, path)


def _read_safetensors(path: Path) -> Mapping[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable .safetensors file ({_first_line(error)})") from error


def _read_pickle(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, KeyError, IndexError, struct.error) as error:
        # weights_only refuses globals it does not know: the file wants code run to load.
        # The others come from text or other bytes read as pickle opcodes.
        if "Unsupported global" in str(error):
            raise CheckpointError(
                f"{path} needs arbitrary code to load, which mprnet refuses for safety; "
                "re-save it as a plain state dict (torch.save(model.state_dict(), ...)) or as .safetensors"
            ) from error
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (unpickling failed)") from error
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as error:
        raise CheckpointError(f"{path} is truncated or corrupt ({_first_line(error)})") from error


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _canonicalize(loaded: object, path: Path) -> dict[str, Tensor]:
    """Unwrap training-checkpoint containers and strip the DataParallel prefix."""
    while isinstance(loaded, Mapping):
        wrapper = next((k for k in _WRAPPER_KEYS if isinstance(loaded.get(k), Mapping)), None)
        if wrapper is None:
            break
        loaded = loaded[wrapper]
    if not isinstance(loaded, Mapping) or not loaded:
        raise CheckpointError(f"{path} holds no state dict (found {type(loaded).__name__})")
    tensors = {str(k).removeprefix("module."): v for k, v in loaded.items() if isinstance(v, Tensor)}
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors")
    return tensors


def build_model(state_dict: Mapping[str, Tensor], source: str, task: str | None = None) -> MPRNet:
    """Build an MPRNet whose widths come from the tensors, and load them.

    With `task`, a file that has exactly another task's published widths is refused with
    a message naming that task, since running it would silently do the wrong restoration.
    """
    try:
        config = infer_config(state_dict)
    except (KeyError, IndexError) as error:
        raise CheckpointError(f"{source} is not an MPRNet checkpoint (no tensor {error})") from error
    if task is not None:
        if task not in TASK_CONFIGS:
            raise ValueError(f"unknown task {task!r}: expected one of {', '.join(TASK_CONFIGS)}")
        fits = task_with_widths(config)
        if fits is not None and fits != task:
            raise CheckpointError(f"{source} looks like a {fits} checkpoint: run `mprnet {fits}`, not `mprnet {task}`")
    model = MPRNet(config)
    _check_tensors(model, state_dict, config, source)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def _check_tensors(model: MPRNet, state_dict: Mapping[str, Tensor], config: MPRNetConfig, source: str) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshapen = [k for k in expected if k in state_dict and tuple(state_dict[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if misshapen:
        key = misshapen[0]
        problems.append(
            f"{len(misshapen)} of the wrong shape (e.g. {key}: {tuple(state_dict[key].shape)}, expected {expected[key]})"
        )
    if problems:
        widths = f"n_feat={config.n_feat}, scale_unetfeats={config.scale_unetfeats}, scale_orsnetfeats={config.scale_orsnetfeats}"
        raise CheckpointError(f"{source} does not match the MPRNet architecture ({widths}): tensors " + "; ".join(problems))


def load_model(path: Path, task: str | None = None) -> MPRNet:
    """Read `path` and return the network it describes, in eval mode, on the CPU."""
    return build_model(read_state_dict(path), str(path), task)
