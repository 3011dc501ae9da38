"""The weights registry and downloads: the real huggingface_hub client against a local fake hub."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from .fake_hub import FakeHub
from typer.testing import CliRunner

from mprnet_cli import weights
from mprnet_cli.cli import app
from mprnet_cli.errors import ConfigError, WeightsUnavailableError
from mprnet_cli.model.config import TASK_CONFIGS

ROOT = Path(__file__).parent.parent
REPO = "deepinv/MPRNet"
DEBLUR = "model_deblurring.pth"
LICENSE = "Academic Public License (swz30/MPRNet): non-commercial use only"
DEBLUR_ORIGIN = "https://drive.google.com/file/d/1QwQUVbk6YVOJViCsOKYNykCsdJSVGRtb/view?usp=sharing"


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tiny_checkpoint: Path) -> Iterator[FakeHub]:
    """A fake hub serving the tiny MPRNet under the registry's deblur name, with the client aimed at it.

    huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE once, at import: its constants are
    set to this test's values. HF_ENDPOINT is read by mprnet per call. The retry back-off
    (time.sleep, about 23 s in all) is skipped.
    """
    import huggingface_hub.constants as constants
    import huggingface_hub.utils._http as http

    with FakeHub() as fake:
        fake.add(REPO, DEBLUR, tiny_checkpoint.read_bytes())
        monkeypatch.setenv("HF_ENDPOINT", fake.url)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", os.environ["HF_HUB_CACHE"])
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(http.time, "sleep", lambda seconds: None)
        yield fake


def records() -> dict[str, dict]:
    path = Path(os.environ["XDG_STATE_HOME"]) / "mprnet" / "first-download-digests.json"
    return json.loads(path.read_text()) if path.exists() else {}


def cache_files() -> list[str]:
    """Every file in the hub cache apart from its lock files and tag."""
    root = Path(os.environ["HF_HUB_CACHE"])
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and ".locks" not in p.parts and p.name != "CACHEDIR.TAG")


def unavailable(task: str = "deblur", spec: str | None = None) -> str:
    with pytest.raises(WeightsUnavailableError) as caught:
        weights.resolve_checkpoint(task, spec)
    assert caught.value.exit_code == 3
    return caught.value.message


# --- the registry ---------------------------------------------------------------------


def test_the_top_level_registry_is_the_packaged_one() -> None:
    assert (ROOT / "weights.toml").read_bytes() == (ROOT / "mprnet_cli" / "weights.toml").read_bytes()


def test_the_registry_describes_each_task_with_its_published_widths_and_license() -> None:
    registry = weights.load_registry()
    assert list(registry) == list(TASK_CONFIGS)
    for task, entry in registry.items():
        assert (entry.n_feat, entry.scale_unetfeats, entry.scale_orsnetfeats) == TASK_CONFIGS[task].widths
        assert entry.repo_id == REPO and entry.license == LICENSE and entry.origin.startswith("https://drive.google.com/")
        assert entry.sha256 == ""  # unknown: not checked against the hub, never invented
    assert [(e.filename, e.trained_on, e.psnr_db, e.ssim) for e in registry.values()] == [
        ("model_deblurring.pth", "GoPro", 32.66, 0.959),
        ("model_deraining.pth", "Rain13K", 36.40, 0.965),
        ("model_denoising.pth", "SIDD", 39.71, 0.958),
    ]


def test_specs_name_a_local_file_or_a_hub_file() -> None:
    assert weights.parse_spec("~/w.pth", "deblur") == Path.home() / "w.pth"
    entry = weights.parse_spec("hf://me/mine/sub/dir/ft.pth@v2", "derain")
    assert (entry.repo_id, entry.filename, entry.revision, entry.sha256) == ("me/mine", "sub/dir/ft.pth", "v2", "")
    assert weights.parse_spec("hf://me/mine/ft.pth", "derain").revision == "main"
    with pytest.raises(ConfigError, match="expected hf://owner/repo/path/file.pth"):
        weights.parse_spec("hf://me/ft.pth", "derain")


def test_the_user_config_overrides_fields_and_a_new_location_drops_the_digest() -> None:
    config = Path(os.environ["XDG_CONFIG_HOME"]) / "mprnet" / "weights.toml"
    config.parent.mkdir(parents=True)
    config.write_text('[deblur]\nsha256 = "ab"\n\n[derain]\nrepo_id = "me/mine"\n')
    registry = weights.load_registry()
    assert (registry["deblur"].sha256, registry["deblur"].filename) == ("ab", DEBLUR)
    assert (registry["derain"].repo_id, registry["derain"].license) == ("me/mine", weights.WeightsEntry.license)
    config.write_text("[deblur]\nsha = 1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'sha' in \[deblur\]"):
        weights.load_registry()


def test_the_environment_variable_points_a_task_elsewhere(monkeypatch: pytest.MonkeyPatch, tiny_checkpoint: Path) -> None:
    monkeypatch.setenv("MPRNET_DEBLUR_WEIGHTS", str(tiny_checkpoint))
    assert weights.resolve_checkpoint("deblur") == tiny_checkpoint
    assert weights.resolve_checkpoint("deblur", "other.pth") == Path("other.pth")  # --weights wins


# --- downloads ----------------------------------------------------------------------------


def test_first_download_announces_records_and_then_works_without_the_server(
    hub: FakeHub, tiny_checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="mprnet")
    path = weights.resolve_checkpoint("deblur")
    assert path.read_bytes() == tiny_checkpoint.read_bytes()
    assert caplog.messages == [
        f"downloading the deblur checkpoint (2.6 MB) from hf://{REPO}/{DEBLUR}@main",
        f"license: {LICENSE}; original: {DEBLUR_ORIGIN}",
    ]
    digest = hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    assert records()[f"hf://{REPO}/{DEBLUR}@main"]["sha256"] == digest
    assert hub.gets() == 1
    hub.stop()
    caplog.clear()
    assert weights.resolve_checkpoint("deblur") == path
    assert caplog.messages == []


def test_offline_uses_the_cache_and_says_what_to_do_without_it(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert unavailable() == (
        "the deblur checkpoint is not in the cache and HF_HUB_OFFLINE is set: go online, unset HF_HUB_OFFLINE, "
        "then run `mprnet weights download deblur`, or pass --weights PATH to a local copy"
    )
    assert hub.requests == []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    path = weights.resolve_checkpoint("deblur")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert weights.resolve_checkpoint("deblur") == path


def test_an_unreachable_hub_is_one_clear_line(hub: FakeHub) -> None:
    hub.stop()
    assert unavailable().startswith("cannot reach the hub to download the deblur checkpoint, which is not cached")


def test_a_registry_digest_mismatch_refuses_the_file_and_keeps_it(hub: FakeHub, tiny_checkpoint: Path) -> None:
    config = Path(os.environ["XDG_CONFIG_HOME"]) / "mprnet" / "weights.toml"
    config.parent.mkdir(parents=True)
    config.write_text(f'[deblur]\nsha256 = "{"0" * 64}"\n')
    digest = hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    for _ in range(2):  # refused on download and again from the cache
        message = unavailable()
        assert f"has sha256 {digest}, but the weights registry says {'0' * 64}" in message
        assert message.endswith("download it again with `mprnet weights download deblur --force`")
    assert len(cache_files()) == 3  # blob, snapshot link, ref: nothing of the user's deleted
    assert records() == {}
    assert hub.gets() == 1


def test_a_file_that_changes_after_its_first_download_is_refused(hub: FakeHub) -> None:
    path = weights.resolve_checkpoint("deblur")
    path.resolve().write_bytes(path.read_bytes()[:-1] + b"x")
    message = unavailable()
    assert "but the first download (" in message and "the file changed since" in message


def test_a_file_that_is_not_an_mprnet_is_refused_every_time(hub: FakeHub, tmp_path: Path) -> None:
    torch.save({"state_dict": {"conv.weight": torch.zeros(2, 3)}}, tmp_path / "other.pth")
    hub.repos[REPO][DEBLUR] = (tmp_path / "other.pth").read_bytes()
    for _ in range(2):
        message = unavailable()
        assert "is not an MPRNet checkpoint (no tensor 'shallow_feat1.0.weight')" in message
        assert message.endswith(
            "Expected an MPRNet deblur checkpoint (the published one has n_feat 96, scale_unetfeats 48, "
            "scale_orsnetfeats 32); point deblur at another file with --weights or MPRNET_DEBLUR_WEIGHTS"
        )
    assert records() == {}


def test_a_missing_file_lists_the_repo_files_that_look_like_the_task(hub: FakeHub) -> None:
    content = hub.repos[REPO].pop(DEBLUR)
    hub.add(REPO, "Deblurring/mprnet_gopro.pth", content)
    hub.add(REPO, "model_deraining.pth", content)
    hub.add(REPO, "README.md", b"card")
    assert unavailable().startswith(
        f"{REPO} (revision main) has no file '{DEBLUR}'; files that look like the deblur checkpoint: "
        f"Deblurring/mprnet_gopro.pth; use one with MPRNET_DEBLUR_WEIGHTS=hf://{REPO}/FILE"
    )
    assert weights.resolve_checkpoint("deblur", f"hf://{REPO}/Deblurring/mprnet_gopro.pth").read_bytes() == content
    hub.repos[REPO].pop("Deblurring/mprnet_gopro.pth")
    assert unavailable().startswith(
        f"{REPO} (revision main) has no file '{DEBLUR}', and none of its checkpoint files (model_deraining.pth) "
        "is named like a deblur one; use one with"
    )


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (500, None, f"the hub failed to serve hf://{REPO}/{DEBLUR}@main (HTTP 500, a server-side problem)"),
        (401, None, f"the hub refused hf://{REPO}/{DEBLUR}@main (HTTP 401): set HF_TOKEN"),
        (403, None, f"the hub refused hf://{REPO}/{DEBLUR}@main (HTTP 403): set HF_TOKEN"),
        (403, "GatedRepo", f"{REPO} is gated: accept its terms on the hub, set HF_TOKEN"),
        (404, "RepoNotFound", f"repository {REPO} not found (or private: then set HF_TOKEN)"),
    ],
)
def test_hub_errors_are_one_line_each(hub: FakeHub, status: int, code: str | None, expected: str) -> None:
    hub.fail(DEBLUR, status, code)
    assert unavailable().startswith(expected)
    assert cache_files() == []


def test_a_connection_cut_mid_file_resumes_or_leaves_nothing(hub: FakeHub, tiny_checkpoint: Path) -> None:
    hub.cut(REPO, DEBLUR, after=100_000)  # every time: the client's resumes fail too
    message = unavailable()
    assert message.startswith(f"the download of hf://{REPO}/{DEBLUR}@main was cut off (peer closed connection")
    assert [name for name in cache_files() if "blobs" in name] == []
    hub.faults.clear()
    hub.cut(REPO, DEBLUR, after=100_000, times=2)  # twice: the client resumes with a Range request
    assert weights.resolve_checkpoint("deblur").read_bytes() == tiny_checkpoint.read_bytes()


def test_a_full_disk_is_one_line_and_leaves_nothing(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.file_download as file_download

    def disk_full(url: str, temp_file: object, **options: object) -> None:
        temp_file.write(b"partial")  # type: ignore[attr-defined]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(file_download, "http_get", disk_full)
    assert unavailable().startswith(f"no space left while downloading hf://{REPO}/{DEBLUR}@main into {os.environ['HF_HUB_CACHE']}")
    assert [name for name in cache_files() if "blobs" in name] == []


def test_two_processes_downloading_at_once_share_one_transfer(hub: FakeHub, tiny_checkpoint: Path) -> None:
    hub.body_delay_s = 1.0
    code = "from mprnet_cli.weights import resolve_checkpoint; print(resolve_checkpoint('deblur'))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    processes = [
        subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [process.communicate(timeout=60) for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs
    paths = {Path(stdout.strip()) for stdout, _ in outputs}
    assert len(paths) == 1 and paths.pop().read_bytes() == tiny_checkpoint.read_bytes()
    assert hub.gets() == 1


# --- the command line ----------------------------------------------------------------------


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_weights_path_list_and_verify(hub: FakeHub, tiny_checkpoint: Path) -> None:
    code, stdout, stderr = run("weights", "path", "deblur")
    path = weights.cached_file(weights.load_registry()["deblur"])
    assert (code, stdout) == (0, f"{path}\n")
    assert stderr == (
        f"downloading the deblur checkpoint (2.6 MB) from hf://{REPO}/{DEBLUR}@main\n"
        f"license: {LICENSE}; original: {DEBLUR_ORIGIN}\n"
    )
    code, stdout, stderr = run("weights", "list")
    rows = [
        "task     source                                    revision  size    cached  license",
        f"deblur   hf://{REPO}/{DEBLUR}  main      2.6 MB  yes     {LICENSE}",
        f"derain   hf://{REPO}/model_deraining.pth   main      ?       no      {LICENSE}",
        f"denoise  hf://{REPO}/model_denoising.pth   main      ?       no      {LICENSE}",
    ]
    assert (code, stdout, stderr) == (0, "\n".join(rows) + "\n", "")
    digest = hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    code, stdout, stderr = run("weights", "verify")
    assert stdout.splitlines()[0].startswith(f"deblur: ok, sha256 {digest} matches the first download (")
    assert (code, stdout.splitlines()[1:], stderr) == (0, ["derain: not cached", "denoise: not cached"], "")
    path.resolve().write_bytes(b"flipped")
    code, stdout, stderr = run("weights", "verify", "deblur")
    assert (code, stdout.split(" does not match")[0]) == (2, f"deblur: FAILED, sha256 {hashlib.sha256(b'flipped').hexdigest()}")
    assert stderr == "error: verification failed for deblur: run `mprnet weights download deblur --force`\n"
    code, stdout, stderr = run("weights", "download", "deblur", "--force")
    assert (code, stdout) == (0, f"deblur: {path}\n")
    assert path.read_bytes() == tiny_checkpoint.read_bytes()


def test_weights_download_of_a_missing_task_exits_3(hub: FakeHub) -> None:
    code, stdout, stderr = run("weights", "download", "all")
    assert (code, stdout.splitlines()[0].startswith("deblur: /")) == (3, True)
    assert stderr.splitlines()[-1].startswith(f"error: {REPO} (revision main) has no file 'model_deraining.pth', and none")


def test_restore_with_no_weights_downloads_the_default(hub: FakeHub, tmp_path: Path) -> None:
    photo = tmp_path / "photo.png"
    shutil.copy(ROOT / "tests" / "data" / "parity" / "input_64x48.png", photo)
    code, stdout, stderr = run("deblur", str(photo), "--device", "cpu")
    assert (code, stdout) == (0, "")
    lines = stderr.splitlines()
    assert lines[:2] == [
        f"downloading the deblur checkpoint (2.6 MB) from hf://{REPO}/{DEBLUR}@main",
        f"license: {LICENSE}; original: {DEBLUR_ORIGIN}",
    ]
    assert lines[2].startswith(f"{photo} -> {tmp_path / 'photo_deblurred.png'} (0.00 MP, ")
    assert (tmp_path / "photo_deblurred.png").is_file()


def test_restore_offline_without_a_cache_exits_3_with_one_line(hub: FakeHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    photo = tmp_path / "photo.png"
    shutil.copy(ROOT / "tests" / "data" / "parity" / "input_64x48.png", photo)
    assert run("deblur", str(photo), "--device", "cpu") == (
        3,
        "",
        "error: the deblur checkpoint is not in the cache and HF_HUB_OFFLINE is set: go online, unset HF_HUB_OFFLINE, "
        "then run `mprnet weights download deblur`, or pass --weights PATH to a local copy\n",
    )
