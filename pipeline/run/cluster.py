"""Cluster profiles from cluster.yaml: build the cluster (or its spec) a profile describes.

A profile's ``type`` names an entry of ``CLUSTER_TYPES``: a ``ClusterKind`` says how its options
become a cluster and a client, how long to wait for the first worker, whether it may start while
the run is prepared, and what it needs installed. A new type is one ``CLUSTER_TYPES.register``
call (at the end of this module, or ``"package.module:KIND"`` from elsewhere), not another branch.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml

from pipeline.core.errors import ConfigError
from pipeline.core.registry import Registry


@dataclass(frozen=True)
class ClusterKind:
    """One cluster type (a profile's ``type:``)."""

    start: Callable[[dict], tuple[Any, Any]]  # the profile's options -> (cluster or None, Client)
    # seconds to wait for a first worker (profile key `worker_timeout`, flag --worker-timeout): batch
    # schedulers queue jobs, so they get longer than a local cluster that starts in seconds
    worker_timeout: float
    early: bool = False  # cheap to start and nothing queued or billed if unused: started while the run is prepared
    module: str | None = None  # what it imports (checked before anything starts) ...
    extra: str | None = None  # ... and the project's extra that installs it
    executable: str | None = None  # a scheduler command it needs on PATH


CLUSTER_TYPES = Registry("cluster type", "profile")  # filled at the end of this module
log = logging.getLogger(__name__)
# The dashboard's info pages have no authentication: only this machine may see them by default
# (reach it from elsewhere through an SSH tunnel; see the README).
DASHBOARD_ADDRESS = "127.0.0.1:8787"


@dataclass(frozen=True)
class Profile:
    name: str
    type: str  # a name in CLUSTER_TYPES
    options: dict
    worker_timeout: float = 120.0  # seconds to wait for the first worker (load_profile: the type's)

    def __repr__(self) -> str:
        return f"Profile({self.name!r}, type={self.type!r})"


# libyaml's safe loader where PyYAML was built with it (the same documents, ~10x faster)
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def profile_for(cluster) -> Profile:
    """The profile a ``ClusterConfig`` names. A run resolves it once, in the driver (jobs.score_dataset,
    or ``lifecycle.run`` through ``validate``), and hands the Profile to the checks and the cluster start."""
    return load_profile(cluster.profile or None, cluster.path, required=cluster.file is not None)


def load_profile(name: str | None, path: str = "cluster.yaml", required: bool = False) -> Profile:
    """required: the user named the file (--cluster-file), so a missing file is an error rather
    than a fall-back to the built-in local profiles."""
    try:
        with open(path) as f:
            doc = yaml.load(f, Loader=_SAFE_LOADER) or {}
    except FileNotFoundError:
        if required:
            raise ConfigError(f"--cluster-file {path} does not exist; pass an existing profiles file (see cluster.yaml in the repository)") from None
        if name in (None, "local", "inprocess"):
            doc = {"profiles": {"local": {"type": "local"}, "inprocess": {"type": "local", "processes": False}}}
        else:
            raise ConfigError(f"--cluster-file {path} does not exist; pass the file that defines profile {name!r}") from None
    profiles = doc.get("profiles") or {}
    name = name or doc.get("default") or "local"
    if name not in profiles:
        raise ConfigError(f"no profile {name!r} in {path}; profiles there: {', '.join(profiles) or 'none'}")
    opts = dict(profiles[name] or {})
    kind = opts.pop("type", "local")
    if kind not in CLUSTER_TYPES:
        raise ConfigError(f"profile {name!r} in {path} has type {kind!r}; registered cluster types: {', '.join(CLUSTER_TYPES)} "
                          "(pipeline.run.cluster.CLUSTER_TYPES)")
    timeout = opts.pop("worker_timeout", CLUSTER_TYPES[kind].worker_timeout)
    return Profile(name, kind, opts, float(timeout))


# A GPU driver's device files: without any, torch sees no GPU (NVIDIA: nvidiactl; AMD ROCm: kfd).
GPU_DRIVER_FILES = ("/dev/nvidiactl", "/proc/driver/nvidia", "/dev/kfd")


def gpu_driver_present() -> bool:
    return not sys.platform.startswith("linux") or any(os.path.exists(p) for p in GPU_DRIVER_FILES)


def gpu_count() -> int:
    """GPUs torch sees; 0 without importing torch on a Linux machine with no GPU driver. The local
    cluster starts in a thread beside the driver's own torch import, and importing torch there held
    the worker's start back until both imports were done (measured: the worker process appeared
    about 2.5 s into the run instead of 1 s, so its imports fell into the scoring phase)."""
    if not gpu_driver_present():
        return 0
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001
        return 0


def local_kwargs(opts: dict) -> dict:
    kw = dict(opts)
    if kw.get("n_workers", "auto") == "auto":
        kw["n_workers"] = max(1, gpu_count())
    kw.setdefault("threads_per_worker", 2)  # one shard writes while the next scores
    kw.setdefault("dashboard_address", DASHBOARD_ADDRESS)
    # each worker's own HTTP server (its /metrics and info pages): on every interface by default,
    # where a local cluster's other listeners are on loopback (set it in the profile to open it)
    kw.setdefault("worker_dashboard_address", "127.0.0.1:0")
    return kw


def cuda_kwargs(opts: dict) -> dict:
    kw = {k: v for k, v in opts.items() if v is not None}
    kw.setdefault("threads_per_worker", 2)
    kw.setdefault("dashboard_address", DASHBOARD_ADDRESS)
    return kw


def slurm_kwargs(opts: dict) -> tuple[dict, int]:
    kw = {k: v for k, v in opts.items() if v is not None and k != "jobs"}
    kw["scheduler_options"] = {"dashboard_address": DASHBOARD_ADDRESS, **(kw.get("scheduler_options") or {})}
    if isinstance(kw.get("local_directory"), str):
        kw["local_directory"] = os.path.expandvars(kw["local_directory"])
    return kw, int(opts.get("jobs", 1))


def kubernetes_spec(opts: dict) -> dict:
    """The DaskCluster custom resource the operator would create (no cluster contact)."""
    from dask_kubernetes.operator import make_cluster_spec

    return make_cluster_spec(
        name=opts.get("name", "cxr-audit"),
        image=opts.get("image", "ghcr.io/dask/dask:latest"),
        n_workers=opts.get("n_workers", 1),
        resources=opts.get("resources"),
        env=opts.get("env"),
    )


def address_security(opts: dict):
    from distributed.security import Security

    sec = opts.get("security")
    return Security(**sec) if sec else None


def nanny_environ() -> dict:
    """Dask's worker environment without MALLOC_TRIM_THRESHOLD_=65536: with it, glibc returns
    every freed block to the OS and DenseNet-121's large activations page-fault on each batch
    (measured: forward 2.1 s -> 3.1 s per 32 films on the 2-core CPU). And torch's OpenMP
    threads sleep at once when idle (OMP_WAIT_POLICY=PASSIVE, unless set in the environment):
    by default they spin at every barrier on the cores the decode processes need (measured with
    the tiny network, score_shard in one process beside its 2 decode processes on 2 busy cores:
    its CPU per film 3.8 ms -> 1.9 ms; in a Dask worker the two measured alike, but a worker's
    thread may start torch's pool too)."""
    import dask

    env = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}) or {})
    env.pop("MALLOC_TRIM_THRESHOLD_", None)
    if "OMP_WAIT_POLICY" not in os.environ:
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


PROFILE_ENV = "DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED"


def local_worker_config() -> dict:
    """The Dask configuration a local cluster's nannies hand their workers: nanny_environ(), and
    no statistical profiler unless PROFILE_ENV is set: it walks every thread's stack each 10 ms on
    the event loop of the process that drives the model (about a quarter of that loop's CPU during
    scoring, taken from the decode processes on a CPU worker). The dashboard's Profile page is
    empty without it; set DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=True to have it."""
    import dask

    cfg: dict = {"distributed.nanny.pre-spawn-environ": nanny_environ(),
                 # the worker starts importing torch and the scoring code as it starts (a thread): the
                 # import overlaps the driver's preparation instead of the first shards' decoding
                 "distributed.worker.preload": [*dask.config.get("distributed.worker.preload", []), "pipeline.worker.preload"]}
    if PROFILE_ENV not in os.environ:
        cfg["distributed.worker.profile.enabled"] = False
    return cfg


class _LastError(logging.Handler):
    """Keeps the last error a cluster's background tasks logged (a failed sbatch, an image pull)."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.message: str | None = None

    def emit(self, record):
        exc = record.exc_info[1] if record.exc_info else None
        text = f"{type(exc).__name__}: {exc}" if exc is not None else record.getMessage()
        self.message = " ".join(text.split())[:500]


def _check_shm(profile: Profile) -> None:
    """A ClusterStartError naming /dev/shm when it cannot hold semaphores: a local cluster's worker
    processes talk through them (distributed's nannies: "Nanny failed to start")."""
    from pipeline.core.errors import ClusterStartError
    from pipeline.worker.decode_pool import shm_problem

    why = shm_problem()
    if why:
        raise ClusterStartError(
            f"cluster profile {profile.name!r} ({profile.type}) cannot start worker processes: {why}. Free space in "
            "/dev/shm (df -h /dev/shm) or mount it writable, or run without worker and decode processes: "
            "--cluster inprocess --decode-workers 0.")


def start_cluster(profile: Profile, worker_timeout: float | None = None) -> tuple[Any, Any]:
    """Return (cluster or None, Client) once at least one worker is up; the caller closes both.
    A cluster that brings up no worker within worker_timeout seconds (default: the profile's) is a
    ClusterStartError naming the last error its background tasks logged."""
    from pipeline.core.errors import ClusterStartError

    timeout = profile.worker_timeout if worker_timeout is None else worker_timeout
    if profile.type.startswith("local") and profile.options.get("processes", True):
        _check_shm(profile)  # before the nannies log their tracebacks
    catcher = _LastError()
    logging.getLogger().addHandler(catcher)
    cluster = client = None
    try:
        with warnings.catch_warnings():
            # a taken dashboard port: distributed picks a free one, and the link we print says which
            warnings.filterwarnings("ignore", message=r"Port .* is already in use", category=UserWarning)
            cluster, client = _make_cluster(profile)
        try:
            client.wait_for_workers(1, timeout=timeout)
        except (TimeoutError, OSError) as e:
            cause = catcher.message or f"{type(e).__name__}: {e}".strip()
            raise ClusterStartError(
                f"cluster profile {profile.name!r} ({profile.type}) brought up no worker in {timeout:.0f} s. "
                f"Last error: {cause}. Check the profile in --cluster-file, or wait longer with --worker-timeout."
            ) from None
    except BaseException as e:
        for thing in (client, cluster):
            if thing is not None:
                try:
                    thing.close()
                except Exception:  # noqa: BLE001 - already failing; the original error matters
                    pass
        if isinstance(e, Exception) and not isinstance(e, ClusterStartError):
            _check_shm(profile)
        raise
    finally:
        logging.getLogger().removeHandler(catcher)
    return cluster, client


class ClusterStarter:
    """Brings the cluster up in a background thread while the driver prepares the run (manifest,
    checkpoint check, stores), then warms its workers: decode processes started, scoring code
    imported and, on a local cluster, the run's model loaded (``decode_pool.warm``). Batch
    schedulers (SLURM, Kubernetes) are only asked for workers once the run is known to have shards
    to score (``result()``), as before."""

    def __init__(self, profile: Profile, worker_timeout: float | None = None, warm: tuple = ()):
        self.profile = profile
        self.seconds: float | None = None  # how long the start took, wherever it overlapped
        self._args = (worker_timeout, warm)
        self._result: tuple[Any, Any] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._start, name="cluster-start", daemon=True)
        kind = CLUSTER_TYPES[profile.type]
        if kind.early:
            if kind.module:
                try:  # imported here, in the caller's thread, in case its import touches signal handlers
                    importlib.import_module(kind.module)
                except ImportError:
                    pass  # _make_cluster says what to install
            self._thread.start()

    @property
    def started(self) -> bool:
        return self._thread.ident is not None

    def _start(self) -> None:
        worker_timeout, warm = self._args
        t = time.perf_counter()
        try:
            self._result = start_cluster(self.profile, worker_timeout)
            self.seconds = time.perf_counter() - t
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread by result()
            self._error = e
            return
        if warm:
            from pipeline.worker.decode_pool import warm_up

            try:
                self._result[1].run(warm_up, *warm)
            except Exception as e:  # noqa: BLE001 - only a head start: the shards do the same work
                log.debug(f"worker warm-up failed: {e}")

    def result(self) -> tuple[Any, Any]:
        """(cluster or None, client) once a worker is up; raises what the start raised. A deferred
        start runs here, in the caller's thread (dask-jobqueue sets a signal handler on import,
        which only the main thread may do)."""
        if self._thread.ident is None:
            self._start()
        else:
            self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def close(self) -> None:
        """Close whatever was started (waits for a start in progress to finish first)."""
        if self._thread.ident is not None:
            self._thread.join()
        for thing in reversed(self._result or ()):
            if thing is not None:
                try:
                    thing.close()
                except Exception:  # noqa: BLE001 - closing an unused cluster must not mask the caller's error
                    pass


def _make_cluster(profile: Profile) -> tuple[Any, Any]:
    kind = CLUSTER_TYPES[profile.type]
    if kind.module:
        try:
            importlib.import_module(kind.module)
        except ImportError:
            raise ConfigError(missing_module(profile, kind)) from None
    return kind.start(profile.options)


def missing_module(profile: Profile, kind: ClusterKind) -> str:
    return f"profile {profile.name!r} (type {profile.type}) needs {kind.module}: pip install 'cxr-audit[{kind.extra}]'"


# ------------------------------------------------------------------ the cluster types
def _local_start(o: dict) -> tuple[Any, Any]:
    import dask
    from distributed import Client, LocalCluster

    with dask.config.set(local_worker_config()):
        cluster = LocalCluster(**local_kwargs(o))
    return cluster, Client(cluster)


def _local_cuda_start(o: dict) -> tuple[Any, Any]:
    import dask
    from dask_cuda import LocalCUDACluster
    from distributed import Client

    with dask.config.set(local_worker_config()):
        cluster = LocalCUDACluster(**cuda_kwargs(o))
    return cluster, Client(cluster)


def _slurm_start(o: dict) -> tuple[Any, Any]:
    from dask_jobqueue import SLURMCluster
    from distributed import Client

    kw, jobs = slurm_kwargs(o)
    cluster = SLURMCluster(**kw)
    cluster.scale(jobs=jobs)
    return cluster, Client(cluster)


def _kubernetes_start(o: dict) -> tuple[Any, Any]:
    from dask_kubernetes.operator import KubeCluster
    from distributed import Client

    cluster = KubeCluster(custom_cluster_spec=kubernetes_spec(o))
    return cluster, Client(cluster)


def _address_start(o: dict) -> tuple[Any, Any]:
    from distributed import Client

    return None, Client(o["address"], security=address_security(o))


CLUSTER_TYPES.register("local", ClusterKind(_local_start, 120, early=True), help="distributed LocalCluster on this machine")
CLUSTER_TYPES.register("local-cuda", ClusterKind(_local_cuda_start, 120, early=True, module="dask_cuda", extra="cuda"),
                       help="dask-cuda LocalCUDACluster, one worker per GPU")
CLUSTER_TYPES.register("slurm", ClusterKind(_slurm_start, 1800, module="dask_jobqueue", extra="slurm", executable="sbatch"),
                       help="dask-jobqueue SLURMCluster")
CLUSTER_TYPES.register("kubernetes", ClusterKind(_kubernetes_start, 900, module="dask_kubernetes", extra="kubernetes"),
                       help="dask-kubernetes operator KubeCluster")
CLUSTER_TYPES.register("address", ClusterKind(_address_start, 60), help="an existing scheduler at `address:`")
