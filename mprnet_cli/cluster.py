"""The same batch on a Ray cluster: the driver plans and reports, Ray Data's actors restore.

The driver (this process) plans the jobs as a local batch does, resolves and verifies the
checkpoint once, and puts its bytes in Ray's object store. A Ray Data pipeline hands
one job at a time to a pool of actors; each actor loads the model once from those bytes
(checking their digest first, so no worker ever needs the hub) and then reads, restores
and writes each image itself with the local code (`pipeline.read_source`,
`restore_picture`, `write_target`): outputs never travel back through the driver, only
one small outcome row per job does, which becomes the same `Outcome` a local batch yields.

An actor restores one job at a time: reading and writing are not overlapped with the
network inside an actor, as the local batch's threads overlap them (docs/cluster.md
measures what that costs). A clip is one job (see docs/cluster.md for why).

Ray restarts a worker that dies (out of memory, node lost) and retries its job once; a
job that kills its worker twice is dropped by Ray Data. Ray Data queues the next job on
an actor while it works, and a queued job dies with the worker too, so the dropped jobs
are run once more, each alone in its actor, and only those dropped again are reported
here as failed; the run goes on.

Ray is an optional extra (`mprnet[ray]`), imported only here and only when used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import socket
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mprnet_cli import errors, library_messages
from mprnet_cli.errors import ConfigError, MprnetError
from mprnet_cli.pipeline import Job, Outcome
from mprnet_cli.video import Encoding, Span

logger = logging.getLogger("mprnet")

#: A job whose worker dies is retried this many times before it is reported as failed.
RETRIES = 1
#: How long the driver waits for a cluster's address to answer.
CONNECT_SECONDS = 10.0
#: Where a Ray cluster is found when --ray-address is not given.
ADDRESS_VARIABLE = "RAY_ADDRESS"


@dataclass(frozen=True)
class WorkerSettings:
    """All an actor needs besides the checkpoint's bytes to restore as the local batch does."""

    task: str
    #: Filled in by `run_jobs` from the checkpoint it ships.
    checkpoint_name: str = ""
    digest: str = ""
    device: str = "auto"
    precision: str = "auto"
    restorer_options: dict[str, Any] = field(default_factory=dict)
    quality: int = 95
    max_pixels: int | None = None
    encoding: Encoding = Encoding()
    span: Span = Span()
    resume: bool = False


@dataclass(frozen=True)
class ClusterOptions:
    """`--ray-address` (None: RAY_ADDRESS, else a Ray instance started on this machine) and
    `--workers` (None: one per GPU, or one CPU actor per node)."""

    address: str | None = None
    workers: int | None = None


def import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data is a separate part of the ray package
    except ImportError:
        raise ConfigError("--ray needs Ray Data: pip install 'mprnet[ray]'") from None
    return ray


def _sha256(data: bytes) -> str:
    """Of the checkpoint's bytes as shipped (weights.file_sha256 hashes a file)."""
    return hashlib.sha256(data).hexdigest()


class RestoreWorker:
    """A Ray Data actor: the model, loaded once, and the local read-restore-write of one job."""

    def __init__(self, checkpoint: list[Any], settings: WorkerSettings) -> None:
        import ray

        self.settings = settings
        self.node = ray.get_runtime_context().get_node_id()
        #: Why this worker cannot restore anything (no such device here, say): each call
        #: says so, and the driver stops the run with it, rather than Ray retrying forever.
        self.unable: MprnetError | None = None
        try:
            self.restorer = self._load(ray.get(checkpoint[0]))
        except MprnetError as error:
            self.unable = type(error)(f"a Ray worker cannot start: {error.message}", exit_code=error.exit_code)

    def _load(self, data: bytes) -> Any:
        import torch

        from mprnet_cli.devices import resolve_device
        from mprnet_cli.model.restorer import Restorer

        settings = self.settings
        # Ray pins a CPU actor's thread pools to the CPUs it reserved, which leaves one
        # of them to reading and writing; the network should use them all, as it does locally.
        torch.set_num_threads(os.cpu_count() or 1)
        if _sha256(data) != settings.digest:
            raise errors.CheckpointError(f"{settings.checkpoint_name}: the checkpoint arrived damaged "
                                         f"(sha256 differs from the driver's {settings.digest[:12]})")
        with tempfile.TemporaryDirectory(prefix="mprnet-checkpoint-") as folder:
            path = Path(folder) / settings.checkpoint_name
            path.write_bytes(data)
            return Restorer.from_checkpoint(path, settings.task, device=resolve_device(settings.device),
                                            precision=settings.precision, **settings.restorer_options)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[Any]]:
        jobs = [Job(source, target, video or None)
                for source, target, video in zip(batch["source"], batch["target"], batch["video"])]
        rows = [self._restore(job) if self.unable is None else _row(Outcome(job, error=self.unable), self.node, True)
                for job in jobs]
        return {key: [row[key] for row in rows] for key in OUTCOME_COLUMNS} | {"index": list(batch["index"])}

    def _restore(self, job: Job) -> dict[str, Any]:
        from mprnet_cli import pipeline

        settings = self.settings
        if job.video is not None:  # a clip streams through its own reader and writer threads
            return _row(pipeline.restore_clip(self.restorer, job, settings.encoding, settings.span, settings.resume), self.node)
        started = time.perf_counter()
        try:
            picture = pipeline.read_source(job.source, settings.max_pixels)
            computed = time.perf_counter()
            restored = pipeline.restore_picture(self.restorer, picture)
            compute_seconds = time.perf_counter() - computed
            pipeline.write_target(restored, job.target, "PNG", settings.quality)
        except Exception as error:  # kept per job, as the local batch keeps it
            if not isinstance(error, MprnetError):
                error = MprnetError(f"{job.source}: cannot restore ({type(error).__name__}: {error})")
            return _row(Outcome(job, error=error, seconds=time.perf_counter() - started), self.node)
        height, width = restored.pixels.shape[:2]
        return _row(Outcome(job, megapixels=height * width / 1e6, seconds=time.perf_counter() - started,
                            compute_seconds=compute_seconds), self.node)


OUTCOME_COLUMNS = ("error", "error_kind", "exit_code", "megapixels", "seconds", "compute_seconds", "frames",
                   "duration", "node", "unable")


def _row(outcome: Outcome, node: str, unable: bool = False) -> dict[str, Any]:
    error = outcome.error
    return {"unable": unable,
        "error": "" if error is None else error.message,
        "error_kind": "" if error is None else type(error).__name__,
        "exit_code": 0 if error is None else error.exit_code,
        "megapixels": outcome.megapixels, "seconds": outcome.seconds, "compute_seconds": outcome.compute_seconds,
        "frames": outcome.frames, "duration": outcome.duration, "node": node,
    }


def _outcome(job: Job, row: dict[str, Any]) -> Outcome:
    error = None
    if row["error"]:
        kind = getattr(errors, str(row["error_kind"]), MprnetError)
        if not (isinstance(kind, type) and issubclass(kind, MprnetError)):
            kind = MprnetError
        error = kind(str(row["error"]), exit_code=int(row["exit_code"]))
    return Outcome(job, error=error, megapixels=float(row["megapixels"]), seconds=float(row["seconds"]),
                   compute_seconds=float(row["compute_seconds"]), frames=int(row["frames"]),
                   duration=float(row["duration"]), node=str(row["node"]))


def run_jobs(jobs: list[Job], checkpoint: Path, settings: WorkerSettings, options: ClusterOptions = ClusterOptions(),
             ) -> Iterator[Outcome]:
    """Restore `jobs` on the cluster, yielding each `Outcome` as its worker finishes it (in
    the order they finish). Stopping early (an interrupt, or not iterating further) cancels
    the rest and leaves no partial output."""
    if settings.device.startswith("cuda:"):
        raise ConfigError(f"--device {settings.device}: with --ray each worker is given a GPU of its own; "
                          "use --device cuda")
    ray = import_ray()
    # Ray's driver prints what the scheduler reports (each retried job...) on stdout, and
    # its C++ core on descriptor 2; our lines say what matters (MPRNET_DEBUG=1: theirs too).
    debugging = logger.isEnabledFor(logging.DEBUG)
    with open(os.devnull, "w") as nowhere, contextlib.redirect_stdout(sys.stderr if debugging else nowhere), \
            library_messages.silenced():
        yield from _run(ray, jobs, checkpoint, settings, options)


def _run(ray: Any, jobs: list[Job], checkpoint: Path, settings: WorkerSettings, options: ClusterOptions,
         ) -> Iterator[Outcome]:
    connected_here = _connect(ray, options.address)
    began = time.time()
    done: set[int] = set()
    try:
        data = checkpoint.read_bytes()
        settings = dataclasses.replace(settings, checkpoint_name=checkpoint.name, digest=_sha256(data))
        reference = ray.put(data)
        del data
        yield from _outcomes(_pipeline(ray, jobs, [reference], settings, options.workers), jobs, done)
        dropped = [index for index in range(len(jobs)) if index not in done]
        if dropped:  # each alone this time: a job queued behind one that killed its worker died with it
            retried, again = [jobs[index] for index in dropped], set[int]()
            yield from _outcomes(_pipeline(ray, retried, [reference], settings, options.workers, alone=True),
                                 retried, again)
            done.update(dropped[index] for index in again)
        for index, job in enumerate(jobs):
            if index not in done:  # its worker died twice, alone: Ray Data dropped it
                yield Outcome(job, error=MprnetError(
                    f"{job.source}: its worker died twice while restoring it (out of memory, or its node was lost)",
                    exit_code=1))
    finally:
        # A driver left connected to a cluster goes on printing the scheduler's reports
        # (each task cancelled with the run) on stdout, after the redirect above has ended.
        if connected_here:
            ray.shutdown()
        _remove_partial_files([job for index, job in enumerate(jobs) if index not in done], began)


def _connect(ray: Any, address: str | None) -> bool:
    """Join the cluster at `address` (or RAY_ADDRESS), or start Ray on this machine; True
    when this call connected the process (and so must disconnect it, which also stops a Ray
    it started), False when a caller's own `ray.init` already had, which is left as it is."""
    address = address or os.environ.get(ADDRESS_VARIABLE) or None
    debugging = logger.isEnabledFor(logging.DEBUG)
    if not debugging:
        # Ray and Ray Data log progress, deprecations and each dropped job on their own;
        # our lines say what matters, and MPRNET_DEBUG=1 shows theirs.
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    if address is not None:
        _check_reachable(address)
    connected_before = ray.is_initialized()
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=debugging, configure_logging=False,
                 ignore_reinit_error=True)
    except Exception as error:  # Ray's own kinds: connection, authentication, version mismatch...
        where = address or "a local Ray instance"
        raise ConfigError(f"--ray: cannot connect to {where} ({str(error).splitlines()[0]})") from None
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    # A job that kills its worker twice is dropped, not the run: the driver reports it.
    context.max_errored_blocks = -1
    return not connected_before


def _check_reachable(address: str) -> None:
    """Ray spends minutes retrying an address where nothing listens; a TCP connection says
    at once whether something does (`auto` and other named forms are left to Ray)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_SECONDS).close()
    except OSError as error:
        raise ConfigError(f"--ray: cannot connect to {address} ({error.strerror or error})") from None


def _outcomes(dataset: Any, jobs: list[Job], done: set[int]) -> Iterator[Outcome]:
    """Each finished job's outcome as its row arrives, its index added to `done`; a worker
    unable to run at all stops the run with its error."""
    for row in dataset.iter_rows():
        outcome = _outcome(jobs[int(row["index"])], row)
        if row["unable"] and outcome.error is not None:
            raise outcome.error
        done.add(int(row["index"]))
        yield outcome


def _pipeline(ray: Any, jobs: list[Job], checkpoint: list[Any], settings: WorkerSettings, workers: int | None,
              alone: bool = False) -> Any:
    """`alone`: no job queued on an actor behind the one it restores. Ray Data queues one so
    that an actor never waits for its next job: without it, Ray's throughput on derain at
    512x512 was 27% below the local batch's here, against 8.5% with it (docs/cluster.md)."""
    items = [{"index": index, "source": job.source, "target": job.target, "video": job.video or ""}
             for index, job in enumerate(jobs)]
    node_cpus = [int(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node.get("Alive")]
    resources, pool = actor_plan(settings.device, int(ray.cluster_resources().get("GPU", 0)), node_cpus, workers,
                                 len(jobs))
    compute = ray.data.ActorPoolStrategy(min_size=1, initial_size=pool, max_size=pool,
                                         max_concurrent_calls_per_actor=1,
                                         max_tasks_in_flight_per_actor=1 if alone else None)
    dataset = ray.data.from_items(items, override_num_blocks=len(items))
    with warnings.catch_warnings():
        # max_restarts and max_task_retries have no named parameter yet (Ray 2.60); Ray
        # Data's default retries a job forever, so one image that kills workers would too.
        warnings.simplefilter("ignore")
        return dataset.map_batches(RestoreWorker, batch_size=1, compute=compute,
                                   fn_constructor_args=(checkpoint, settings), batch_format="numpy",
                                   max_restarts=-1, max_task_retries=RETRIES, **resources)


def actor_plan(device: str, gpus: int, node_cpus: list[int], workers: int | None, jobs: int,
               ) -> tuple[dict[str, float], int]:
    """(Ray resources of one actor, number of actors) for a cluster with `gpus` GPUs and
    nodes of `node_cpus` CPUs: one actor per GPU where the device may be a GPU, else one
    per node; `workers` caps them, and so does the number of jobs."""
    if gpus and device in ("auto", "cuda"):
        resources: dict[str, float] = {"num_gpus": 1, "num_cpus": 1}
        pool = gpus
    else:
        cpus = [count for count in node_cpus if count > 0] or [1]
        # Never reserve every CPU of a node: Ray Data's own tasks would wait for one forever.
        resources = {"num_cpus": max(1, min(cpus) - 1)}
        pool = len(cpus)
    return resources, max(1, min(workers or pool, jobs))


def _remove_partial_files(unfinished: list[Job], since: float) -> None:
    """A worker stopped in the middle of a write leaves its temporary file (never the
    output itself): remove those made during this run in the folders of the jobs that did
    not finish."""
    from mprnet_cli.imageio import PARTIAL_PATTERN
    from mprnet_cli.storage import is_uri

    folders = {Path(job.target).parent for job in unfinished if not is_uri(job.target)}
    for folder in folders:
        for partial in folder.glob(PARTIAL_PATTERN):
            with contextlib.suppress(OSError):
                if partial.stat().st_mtime >= since:
                    partial.unlink()
