"""Cluster types are a registry: a profile's `type:` names a ClusterKind, a new type is one
register call, an unknown one lists the registered types. No cluster is started here: a
registered kind whose start returns an object with a client's two methods shows the dispatch."""

from __future__ import annotations

import threading

import pytest
import yaml

from pipeline.core.errors import ClusterStartError, ConfigError
from pipeline.run.cluster import CLUSTER_TYPES, ClusterKind, ClusterStarter, load_profile, start_cluster
from pipeline.run.validate import check_cluster


class _Client:
    """What start_cluster asks of a client: wait for workers, close."""

    def __init__(self, workers: int):
        self.workers, self.closed, self.waited = workers, False, None

    def wait_for_workers(self, n, timeout=None):
        self.waited = timeout
        if self.workers < n:
            raise TimeoutError(f"{self.workers} workers")

    def close(self):
        self.closed = True


@pytest.fixture
def fake_type():
    """Registers type 'fake' for one test: its start records the options and the thread it ran in."""
    calls = []

    def start(options):
        client = _Client(options.get("workers", 1))
        calls.append((options, threading.current_thread().name, client))
        return None, client

    def register(**kw):
        CLUSTER_TYPES.register("fake", ClusterKind(start, **{"worker_timeout": 7, **kw}), help="a test double")
        return calls

    yield register
    CLUSTER_TYPES.unregister("fake")


def _profiles(tmp_path, **profiles) -> str:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({"profiles": profiles}))
    return str(path)


def test_the_registered_types_and_their_worker_timeouts():
    assert tuple(CLUSTER_TYPES) == ("local", "local-cuda", "slurm", "kubernetes", "address")
    assert {n: CLUSTER_TYPES[n].worker_timeout for n in CLUSTER_TYPES} == {
        "local": 120, "local-cuda": 120, "slurm": 1800, "kubernetes": 900, "address": 60}  # README, --worker-timeout
    assert [n for n in CLUSTER_TYPES if CLUSTER_TYPES[n].early] == ["local", "local-cuda"]  # batch schedulers wait for shards


def test_an_unknown_type_lists_the_registered_ones(tmp_path):
    path = _profiles(tmp_path, farm={"type": "pbs"})
    with pytest.raises(ConfigError) as e:
        load_profile("farm", path)
    assert "profile 'farm'" in str(e.value) and "type 'pbs'" in str(e.value)
    assert "registered cluster types: local, local-cuda, slurm, kubernetes, address" in str(e.value)
    from pipeline.run.cluster import Profile

    with pytest.raises(ConfigError, match="unknown profile cluster type 'pbs'; registered: local, local-cuda, slurm"):
        check_cluster(Profile("farm", "pbs", {}))  # a profile built in Python


def test_a_registered_type_is_loaded_started_and_checked_through_the_registry(tmp_path, fake_type):
    calls = fake_type(early=True)
    path = _profiles(tmp_path, mine={"type": "fake", "workers": 2}, slow={"type": "fake", "worker_timeout": 30})
    profile = load_profile("mine", path)
    assert (profile.type, profile.options, profile.worker_timeout) == ("fake", {"workers": 2}, 7.0)  # the kind's default
    assert load_profile("slow", path).worker_timeout == 30.0  # a profile's own wins
    check_cluster(profile)  # needs nothing
    cluster, client = start_cluster(profile)
    assert cluster is None and calls[-1][0] == {"workers": 2} and client is calls[-1][2] and client.waited == 7.0
    # an early kind starts in the starter's background thread, while the run is prepared
    starter = ClusterStarter(profile)
    assert starter.started and starter.result()[1] is calls[-1][2] and calls[-1][1] == "cluster-start"
    starter.close()
    assert calls[-1][2].closed


def test_a_type_that_brings_up_no_worker_is_a_start_error_and_is_closed(tmp_path, fake_type):
    calls = fake_type()
    profile = load_profile("none", _profiles(tmp_path, none={"type": "fake", "workers": 0}))
    with pytest.raises(ClusterStartError, match=r"profile 'none' \(fake\) brought up no worker in 7 s"):
        start_cluster(profile)
    assert calls[-1][2].closed
    starter = ClusterStarter(profile)
    assert not starter.started and len(calls) == 1  # not early: started only when result() asks for it


def test_what_a_type_needs_is_checked_before_anything_starts(tmp_path, fake_type):
    calls = fake_type(module="no_such_cluster_module", extra="farm", executable="no-such-submit-command")
    profile = load_profile("farm", _profiles(tmp_path, farm={"type": "fake"}))
    with pytest.raises(ConfigError, match="'no-such-submit-command', which is not on PATH"):
        check_cluster(profile)
    CLUSTER_TYPES.unregister("fake")
    fake_type(module="no_such_cluster_module", extra="farm")
    with pytest.raises(ConfigError, match=r"needs no_such_cluster_module: pip install 'cxr-audit\[farm\]'"):
        check_cluster(profile)
    with pytest.raises(ConfigError, match="needs no_such_cluster_module"):
        start_cluster(profile)  # the same error if the check was skipped
    assert not calls
