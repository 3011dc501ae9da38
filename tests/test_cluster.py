"""`--ray`: the same batch on a Ray cluster, through a real Ray instance on this machine.

Ray runs go through a real `mprnet` process, as a user runs them (Ray's driver state and
the CLI's stderr handling are per process). One test lets `--ray` start Ray itself; the
others join one Ray head started for the module (`ray start`, 2 CPUs, no dashboard), which
saves a Ray start each. A worker killed in the middle, and an image that kills its worker
every time, are staged with an audit hook that the head's workers load through
`sitecustomize`: the worker process really dies, and Ray really restarts it.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import socket
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from mprnet_cli.cli import app

from .conftest import TINY_CHECKPOINT, interruptible, write_image
from .test_storage import bucket, s3_server  # noqa: F401 - the S3 server's fixtures

ray = pytest.importorskip("ray", reason="the Ray tests need the extra: pip install 'mprnet[ray]'")

runner = CliRunner()
WEIGHTS = ["--weights", str(TINY_CHECKPOINT)]
MPRNET = Path(sys.executable).parent / "mprnet"
RAY = Path(sys.executable).parent / "ray"

#: Loaded by the head's workers: a file named poison.png kills its worker whenever it is
#: opened; victim.png kills it the first time (a marker beside it remembers).
DEADLY_FILES = textwrap.dedent("""
    import os, sys

    def _die(event, args):
        if event != "open" or not isinstance(args[0], str):
            return
        if args[0].endswith("poison.png"):
            os._exit(9)
        marker = os.path.join(os.path.dirname(args[0]), ".killed")
        if args[0].endswith("victim.png") and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(9)  # as the OOM killer would: at once, mid-job

    if sys.argv[0].endswith("default_worker.py"):  # Ray's workers, not a driver
        sys.addaudithook(_die)
""")


@dataclass(frozen=True)
class Head:
    """A Ray head on this machine, and the environment a driver needs to join it."""

    address: str
    env: dict[str, str]


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Head]:
    """A Ray head with 2 CPUs and no dashboard; its workers load DEADLY_FILES."""
    home = tmp_path_factory.mktemp("ray-home")
    (home / "sitecustomize.py").write_text(DEADLY_FILES)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    token = home / "token"
    token.write_text(secrets.token_hex(32))
    auth = {"RAY_AUTH_TOKEN_PATH": str(token)}
    env = _env(**auth, PYTHONPATH=os.pathsep.join([str(home), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([str(RAY), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                    "--include-dashboard=false", "--disable-usage-stats"], env=env, check=True, capture_output=True,
                   timeout=120)
    try:
        yield Head(f"127.0.0.1:{port}", auth)
    finally:
        subprocess.run([str(RAY), "stop", "--force"], env=env, capture_output=True, timeout=120)


def _env(**extra: str) -> dict[str, str]:
    # Ray's token authentication, on (as `ray start` has it) also for the drivers.
    return {**os.environ, "NO_COLOR": "1", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", **extra}


def _folder(root: Path, count: int, size: int = 24) -> Path:
    for index in range(count):
        write_image(root / ("sub" if index % 3 == 0 else "") / f"{index:02d}.png", size + 8, size, noise=True)
    return root


def _outputs(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def _mprnet(*arguments: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([str(MPRNET), *arguments], capture_output=True, text=True, env=env or _env(),
                          timeout=timeout)


def test_a_batch_on_ray_writes_what_the_local_batch_writes_and_reports_the_same(tmp_path: Path) -> None:
    """Ray started by `--ray` itself; images and a clip (a clip is one job)."""
    pytest.importorskip("av", reason="the clip needs PyAV: pip install 'mprnet[video]'")
    from mprnet_cli.video import read_frames

    from .test_video import make_clip

    source = _folder(tmp_path / "in", 23)
    make_clip(source / "sub" / "clip.mkv", codec="ffv1", pixel_format="yuv444p")
    (source / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    local = runner.invoke(app, ["deblur", str(source), "-r", "-o", str(tmp_path / "local"), *WEIGHTS])
    assert local.exit_code == 1

    result = _mprnet("deblur", str(source), "-r", "-o", str(tmp_path / "ray"), *WEIGHTS, "--ray")
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    ray_outputs, local_outputs = _outputs(tmp_path / "ray"), _outputs(tmp_path / "local")
    assert sorted(ray_outputs) == sorted(local_outputs) and len(ray_outputs) == 24
    clip = "sub/clip.mkv"  # Matroska gives each file a random segment ID: compare the frames
    assert [(pts, frame.tobytes()) for pts, frame in read_frames(tmp_path / "ray" / clip)] == \
        [(pts, frame.tobytes()) for pts, frame in read_frames(tmp_path / "local" / clip)]
    assert {name: data for name, data in ray_outputs.items() if name != clip} == \
        {name: data for name, data in local_outputs.items() if name != clip}
    lines = result.stderr.splitlines()
    assert [line for line in lines if line.startswith("error:")] == [
        f"error: {source / 'corrupt.png'}: truncated or corrupt image (its header is unreadable)"]
    assert sum(" -> " in line for line in lines) == 24
    assert f"{source / 'sub' / 'clip.mkv'} -> {tmp_path / 'ray' / clip} (5 frames, 0.2 s of video, " in result.stderr
    assert lines[-1].startswith("24 done, 0 skipped, 1 failed; ")
    assert all(line.startswith(("error:", str(source), "24 done")) for line in lines), "Ray's own chatter leaked"

    (source / "corrupt.png").unlink()
    rerun = _mprnet("deblur", str(source), "-r", "-o", str(tmp_path / "ray"), *WEIGHTS, "--ray")
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stderr.splitlines()[-1] == "nothing to do: every output exists (use --overwrite to redo them)"


def test_a_bucket_to_a_bucket_on_ray_writes_what_the_local_batch_writes(bucket: str, tmp_path: Path) -> None:
    """The workers read and write the store themselves, with the credentials of their
    environment (here inherited from the driver that starts Ray)."""
    from mprnet_cli import storage

    from .test_storage import _local_folder, _objects, _upload

    local = _local_folder(tmp_path / "in")
    _upload(local, f"{bucket}/rainy")
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    storage.write_bytes(f"{bucket}/rainy/broken.png", b"\x89PNG\r\n\x1a\n")
    expected = runner.invoke(app, ["deblur", str(local), "-r", "-o", str(tmp_path / "out"), *WEIGHTS])
    assert expected.exit_code == 1
    result = _mprnet("deblur", f"{bucket}/rainy", "-r", "-o", f"{bucket}/clean", *WEIGHTS, "--ray")
    assert result.returncode == 1, result.stderr
    names = ["a.png", "b.jpg", "trip/c.png", "trip/day2/d.tif"]
    assert _objects(f"{bucket}/clean") == [f"{bucket}/clean/{name}" for name in names]
    for name in names:
        assert storage.read_bytes(f"{bucket}/clean/{name}") == (tmp_path / "out" / name).read_bytes(), name
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        f"error: {bucket}/rainy/broken.png: truncated or corrupt image (its header is unreadable)"]


def test_ctrl_c_cancels_the_job_and_leaves_no_partial_file(tmp_path: Path, head: Head) -> None:
    source = _folder(tmp_path / "in", 40, size=160)
    out = tmp_path / "out"
    process = subprocess.Popen([str(MPRNET), "deblur", str(source), "-o", str(out), *WEIGHTS, "--ray",
                                "--ray-address", head.address],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(**head.env), text=True,
                               preexec_fn=interruptible)
    assert process.stderr is not None
    lines = []
    for line in process.stderr:  # the first restored image's line
        lines.append(line)
        if " -> " in line:
            break
    process.send_signal(signal.SIGINT)
    stdout, rest = process.communicate(timeout=120)
    lines += rest.splitlines()
    assert process.returncode == 130, "".join(lines)
    assert stdout == ""
    assert "not done (interrupted)" in lines[-1]
    written = sorted(out.rglob("*"))
    assert all(not path.name.startswith(".") for path in written), written  # no temporary file left
    assert 1 <= len([path for path in written if path.is_file()]) < 40
    for path in written:
        if path.is_file():
            Image.open(path).load()  # whole


def test_a_killed_worker_is_retried_and_an_image_that_kills_twice_is_reported(tmp_path: Path, head: Head) -> None:
    source = _folder(tmp_path / "in", 8)
    write_image(source / "victim.png", 32, 24, noise=True)
    write_image(source / "poison.png", 32, 24, noise=True)
    result = _mprnet("deblur", str(source), "-r", "-o", str(tmp_path / "out"), *WEIGHTS, "--ray", "--ray-address",
                     head.address, env=_env(**head.env))
    assert (source / ".killed").exists(), "the staged worker death did not happen"
    assert result.returncode == 1, result.stderr
    assert sorted(_outputs(tmp_path / "out")) == sorted([*(f"{i:02d}.png" for i in range(8) if i % 3), "victim.png",
                                                         *(f"sub/{i:02d}.png" for i in range(0, 8, 3))])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {source / 'poison.png'}: its worker died twice while restoring it "
                      "(out of memory, or its node was lost)"]
    assert result.stderr.splitlines()[-1].startswith("9 done, 0 skipped, 1 failed; ")


def test_a_device_the_workers_lack_is_one_line_before_any_image(tmp_path: Path, head: Head) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    source = _folder(tmp_path / "in", 3)
    result = _mprnet("deblur", str(source), "-o", str(tmp_path / "out"), *WEIGHTS, "--ray", "--device", "cuda",
                     "--ray-address", head.address, env=_env(**head.env))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: a Ray worker cannot start: --device cuda: no CUDA GPU is available (this PyTorch build or machine has none)"]
    assert not (tmp_path / "out").exists()


# --- refused before any work ---------------------------------------------------------


@pytest.mark.parametrize("option", [["--workers", "2"], ["--ray-address", "127.0.0.1:6379"]])
def test_cluster_options_need_ray(tmp_path: Path, option: list[str]) -> None:
    photo = write_image(tmp_path / "a.png", 16, 16)
    result = runner.invoke(app, ["deblur", str(photo), *WEIGHTS, *option])
    assert result.exit_code == 2
    assert f"'{option[0]}': only applies with --ray" in result.stderr


def test_standard_input_stays_local(tmp_path: Path) -> None:
    result = runner.invoke(app, ["deblur", "-", "-o", "-", *WEIGHTS, "--ray"], input=b"")
    assert result.exit_code == 2
    assert result.stderr == "error: --ray restores files and folders; standard input and output need a local run\n"


def test_an_address_where_nothing_listens_is_one_line_at_once(tmp_path: Path) -> None:
    photo = write_image(tmp_path / "a.png", 16, 16)
    started = time.monotonic()
    result = runner.invoke(app, ["deblur", str(photo), *WEIGHTS, "--ray", "--ray-address", "127.0.0.1:9"])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: --ray: cannot connect to 127.0.0.1:9 (")
    assert len(result.stderr.splitlines()) == 1
    assert time.monotonic() - started < 30  # Ray's own retries take minutes
    assert not (tmp_path / "a_deblurred.png").exists()


def test_without_the_extra_ray_is_one_line_that_says_how_to_install_it(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets where it is not installed
    photo = write_image(tmp_path / "a.png", 16, 16)
    result = runner.invoke(app, ["deblur", str(photo), *WEIGHTS, "--ray"])
    assert result.exit_code == 2
    assert result.stderr == "error: --ray needs Ray Data: pip install 'mprnet[ray]'\n"


# --- several nodes --------------------------------------------------------------------


def test_work_lands_on_every_node_and_only_the_driver_fetches_the_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three nodes on this machine (Ray's own test cluster). The nodes start with no hub
    they can reach and an empty cache: a worker that looked for the checkpoint itself
    would fail. The driver downloads it from a local hub, once."""
    import huggingface_hub.constants as constants
    from ray.cluster_utils import Cluster

    from mprnet_cli import cluster as ray_cluster
    from mprnet_cli import pipeline

    from .fake_hub import FakeHub

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "node-cache"))
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    environment = dict(os.environ)  # Ray's driver sets variables of its own, for later tests' children too
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        for _ in range(2):
            nodes.add_node(num_cpus=2)
        nodes.wait_for_nodes()
        with FakeHub() as hub:
            hub.add("deepinv/MPRNet", "model_deblurring.pth", TINY_CHECKPOINT.read_bytes())
            monkeypatch.setenv("HF_ENDPOINT", hub.url)
            monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "driver-cache"))
            monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "driver-cache"))
            monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
            checkpoint = pipeline.checked_checkpoint("deblur", None)
            plan = pipeline.plan_jobs([str(_folder(tmp_path / "in", 12))], pipeline.OutputNaming("deblur", str(tmp_path / "out")))
            outcomes = list(ray_cluster.run_jobs(plan.jobs, checkpoint, ray_cluster.WorkerSettings("deblur"),
                                                 ray_cluster.ClusterOptions(nodes.address, workers=3)))
            assert not ray.is_initialized()  # it joined the cluster, so it left it: a driver left behind prints on stdout
            node_ids = {node.node_id for node in nodes.list_all_nodes()}
            downloads = hub.gets()
    finally:
        ray.shutdown()
        nodes.shutdown()
        os.environ.clear()
        os.environ.update(environment)
    assert [outcome.error for outcome in outcomes] == [None] * 8
    assert len(node_ids) == 3
    assert {outcome.node for outcome in outcomes} == node_ids
    assert downloads == 1
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [f"{i:02d}.png" for i in range(12) if i % 3]


# --- the plan of actors, and outcomes on their way back ------------------------------


@pytest.mark.parametrize(("device", "gpus", "node_cpus", "workers", "expected"), [
    ("auto", 8, [16, 16], None, ({"num_gpus": 1, "num_cpus": 1}, 8)),  # one per GPU
    ("cuda", 8, [16, 16], 3, ({"num_gpus": 1, "num_cpus": 1}, 3)),     # capped
    ("cpu", 8, [16, 16], None, ({"num_cpus": 15}, 2)),                  # the GPUs are not asked for
    ("auto", 0, [2, 8, 0], None, ({"num_cpus": 1}, 2)),                 # one per node with CPUs, one CPU left free
    ("auto", 0, [1], None, ({"num_cpus": 1}, 1)),
    ("auto", 4, [8], None, ({"num_gpus": 1, "num_cpus": 1}, 2)),        # no more actors than jobs (2)
])
def test_actors_are_one_per_gpu_or_one_per_node_leaving_a_cpu(
        device: str, gpus: int, node_cpus: list[int], workers: int | None, expected: tuple) -> None:
    from mprnet_cli.cluster import actor_plan

    assert actor_plan(device, gpus, node_cpus, workers, jobs=2 if gpus == 4 else 100) == expected


def test_an_outcome_row_comes_back_as_the_same_outcome() -> None:
    from mprnet_cli.cluster import _outcome, _row
    from mprnet_cli.errors import InputError, OutputError
    from mprnet_cli.pipeline import Job, Outcome

    job = Job("in/a.png", "out/a.png")
    for outcome in (Outcome(job, megapixels=1.5, seconds=2.0, compute_seconds=1.8),
                    Outcome(job, error=InputError("in/a.png: truncated", exit_code=2), seconds=0.1),
                    Outcome(job, error=OutputError("out/a.png: cannot write (No space left on device)"))):
        back = _outcome(job, _row(outcome, "node-1"))
        assert replace(back, error=None) == replace(outcome, error=None, node="node-1")
        assert type(back.error) is type(outcome.error)
        if outcome.error is not None:
            assert (back.error.message, back.error.exit_code) == (outcome.error.message, outcome.error.exit_code)


def test_images_dropped_after_two_deaths_are_retried_each_alone_in_its_actor() -> None:
    """Ray Data queues a job on each actor behind the one it restores; the queued job dies
    with a worker that the other kills, and is charged one of its own retries (seen: the
    image after poison.png in the test above, reported as having killed its worker twice).
    So the jobs dropped are run again with nothing queued behind them; the first pass keeps
    Ray Data's queue, which keeps the actors busy."""
    from types import SimpleNamespace

    from mprnet_cli.cluster import WorkerSettings, _pipeline
    from mprnet_cli.pipeline import Job

    strategies: list[dict[str, object]] = []
    dataset = SimpleNamespace(map_batches=lambda *arguments, **options: dataset)
    fake = SimpleNamespace(nodes=lambda: [{"Alive": True, "Resources": {"CPU": 8}}], cluster_resources=dict,
                           data=SimpleNamespace(ActorPoolStrategy=lambda **options: strategies.append(options),
                                                from_items=lambda items, **options: dataset))
    jobs = [Job("in/a.png", "out/a.png"), Job("in/b.png", "out/b.png")]
    for alone in (False, True):
        _pipeline(fake, jobs, [], WorkerSettings("deblur"), None, alone=alone)
    assert [(strategy["max_concurrent_calls_per_actor"], strategy["max_tasks_in_flight_per_actor"])
            for strategy in strategies] == [(1, None), (1, 1)]


def test_only_a_connection_the_run_made_is_closed_after_it() -> None:
    """A Python caller's own `ray.init` stays connected; one the run made is its to close."""
    from types import SimpleNamespace

    from mprnet_cli.cluster import _connect

    settings = SimpleNamespace(enable_progress_bars=True, print_on_execution_start=True, max_errored_blocks=0)
    for connected_before in (True, False):
        fake = SimpleNamespace(is_initialized=lambda: connected_before, init=lambda **options: None,
                               data=SimpleNamespace(DataContext=SimpleNamespace(get_current=lambda: settings)))
        assert _connect(fake, None) is not connected_before
    assert settings.max_errored_blocks == -1


def test_a_numbered_gpu_is_refused_since_each_worker_has_its_own(tmp_path: Path) -> None:
    photo = write_image(tmp_path / "a.png", 16, 16)
    result = runner.invoke(app, ["deblur", str(photo), *WEIGHTS, "--ray", "--device", "cuda:1"])
    assert result.exit_code == 2
    assert result.stderr == ("error: --device cuda:1: with --ray each worker is given a GPU of its own; "
                             "use --device cuda\n")
