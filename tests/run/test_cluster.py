"""Cluster profiles: 'local' runs for real in the job tests; the others must render correctly."""

from pathlib import Path

import pytest

from pipeline.run.cluster import address_security, cuda_kwargs, kubernetes_spec, load_profile, local_kwargs, slurm_kwargs
from pipeline.core.errors import ConfigError

CLUSTER_YAML = str(Path(__file__).resolve().parents[2] / "cluster.yaml")


def test_default_profile_is_local_sized_to_the_machine():
    p = load_profile(None, CLUSTER_YAML)
    assert p.name == "local" and p.type == "local"
    kw = local_kwargs(p.options)
    assert kw["n_workers"] >= 1 and kw["threads_per_worker"] == 2 and kw["processes"] is True


def test_slurm_profile_renders_a_gpu_job_script():
    dask_jobqueue = pytest.importorskip("dask_jobqueue", reason="the slurm extra (dask-jobqueue) is not installed")
    kw, jobs = slurm_kwargs(load_profile("slurm", CLUSTER_YAML).options)
    assert jobs == 4
    with dask_jobqueue.SLURMCluster(**kw) as cluster:  # builds the script; submits nothing
        script = cluster.job_script()
    assert "#SBATCH --gres=gpu:1" in script and "#SBATCH -p gpu" in script
    assert "#SBATCH -t 04:00:00" in script and "--resources GPU=1" in script
    assert "--nthreads 8" in script or "--nworkers 1" in script


def test_kubernetes_profile_renders_a_gpu_cluster_spec():
    pytest.importorskip("dask_kubernetes", reason="the kubernetes extra (dask-kubernetes) is not installed")
    spec = kubernetes_spec(load_profile("kubernetes", CLUSTER_YAML).options)
    assert spec["kind"] == "DaskCluster" and spec["metadata"]["name"] == "cxr-audit"
    worker = spec["spec"]["worker"]
    assert worker["replicas"] == 4
    container = worker["spec"]["containers"][0]
    assert container["image"] == "ghcr.io/cxr-audit/cxr-audit:latest"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_local_cuda_and_address_profiles(tmp_path):
    kw = cuda_kwargs(load_profile("local-cuda", CLUSTER_YAML).options)
    assert kw == {"threads_per_worker": 2, "device_memory_limit": 0.9, "dashboard_address": "127.0.0.1:8787"}
    p = load_profile("address", CLUSTER_YAML)
    assert p.options["address"].startswith("tls://")
    sec = address_security(p.options)
    assert sec.require_encryption and sec.tls_ca_file == "/etc/dask/ca.pem" and sec.tls_client_key == "/etc/dask/client-key.pem"


def test_unknown_profile_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no profile 'gpu-farm'.*local"):
        load_profile("gpu-farm", CLUSTER_YAML)
    with pytest.raises(ConfigError, match="does not exist"):
        load_profile("slurm", str(tmp_path / "none.yaml"))
    assert load_profile(None, str(tmp_path / "none.yaml")).type == "local"


def test_cluster_starter_warms_a_local_worker_and_defers_batch_schedulers(tmp_path, monkeypatch):
    """A local cluster starts while the driver prepares the run, and its worker starts its decode
    processes without waiting for a shard; SLURM/Kubernetes/address clusters are only asked for once
    the run has shards to score."""
    import time

    from pipeline.run.cluster import ClusterStarter, Profile

    remote = ClusterStarter(Profile("remote", "address", {"address": "tcp://127.0.0.1:9"}))
    assert not remote.started
    remote.close()  # nothing was started, nothing to wait for

    from pipeline.worker import decode_pool

    from pipeline.inference import model as model_cache
    from pipeline.inference.model_spec import ModelSpec

    decode_pool._close_shared()  # (isolation, not an assertion) an earlier test's in-process worker may have left this process a pool
    spec = ModelSpec("tiny", "random:7")  # a seed no other test loads
    loads = []
    real_load = model_cache.load_model
    monkeypatch.setattr(model_cache, "load_model", lambda s: loads.append(s) or real_load(s))
    starter = ClusterStarter(Profile("inprocess", "local", {"n_workers": 1, "processes": False, "dashboard_address": ":0"}),
                             warm=(1, ("json",), (spec, "cpu")))
    assert starter.started
    cluster, client = starter.result()
    try:
        assert starter.seconds is not None and starter.seconds > 0
        # the worker (threads of this process) has started its decode process: this process's shared
        # pool of one (the one every shard task uses) has a live process
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not decode_pool.shared_pool(1).pids():
            time.sleep(0.05)
        assert len(decode_pool.shared_pool(1).pids()) == 1
        while time.monotonic() < deadline and spec not in loads:
            time.sleep(0.05)
        assert loads == [spec]  # it loaded the run's model before any shard asked for it ...
        model_cache.get_model(spec, "cpu")
        assert loads == [spec]  # ... into the cache a shard task reads: not loaded again
    finally:
        starter.close()
        decode_pool._close_shared()
    assert cluster.status.name == "closed"


def test_cluster_starter_raises_the_start_error_in_the_caller():
    from pipeline.run.cluster import ClusterStarter, Profile

    starter = ClusterStarter(Profile("bad", "local", {"n_workers": 1, "processes": False, "no_such_option": 1}))
    with pytest.raises(TypeError):
        starter.result()
    starter.close()


def test_local_workers_do_not_spin_or_profile_unless_the_user_says(monkeypatch):
    from pipeline.run.cluster import PROFILE_ENV, local_worker_config

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv(PROFILE_ENV, raising=False)
    cfg = local_worker_config()
    env = cfg["distributed.nanny.pre-spawn-environ"]
    assert env["OMP_WAIT_POLICY"] == "PASSIVE" and "MALLOC_TRIM_THRESHOLD_" not in env
    assert cfg["distributed.worker.profile.enabled"] is False
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the user's own settings reach the worker as they are
    monkeypatch.setenv(PROFILE_ENV, "True")
    cfg = local_worker_config()
    assert "OMP_WAIT_POLICY" not in cfg["distributed.nanny.pre-spawn-environ"] and "distributed.worker.profile.enabled" not in cfg


def test_counting_gpus_without_a_gpu_driver_does_not_import_torch():
    """The cluster-start thread sizes a local cluster while the driver imports torch; on a machine
    without a GPU driver it must not wait for that import (fixed cost, issue 8)."""
    import subprocess
    import sys

    from pipeline.run.cluster import gpu_driver_present

    if gpu_driver_present():
        pytest.skip("a GPU driver is present: the count comes from torch")
    code = "import sys; from pipeline.run.cluster import local_kwargs; print(local_kwargs({})['n_workers'], 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[2])
    assert out.stdout.split() == ["1", "False"]
