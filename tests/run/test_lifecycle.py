"""The run's lifecycle (pipeline/run/lifecycle.py), called as functions: the steps it records in
run.json, aggregation and probes on the scoring cluster, no wait for a cluster without work, and
steps after "complete" that cannot undo it."""

from __future__ import annotations

from pathlib import Path

import pytest

import pipeline.worker.score_shard
from pipeline.run import lifecycle
from pipeline.run.scoring import ScoreConfig
from pipeline.store.layout import OutputStore

from tests.conftest import TINY_ARCH

CLUSTER_FILE = str(Path(__file__).resolve().parents[2] / "cluster.yaml")


@pytest.fixture(scope="module")
def client():
    from pipeline.run.cluster import Profile, start_cluster

    cluster, client = start_cluster(Profile("test", "local", {"n_workers": 1, "threads_per_worker": 2, "processes": False,
                                                              "dashboard_address": None}))
    yield client
    client.close()
    cluster.close()


_REAL_SCORE_SHARD = pipeline.worker.score_shard.score_shard


def _second_shard_fails(shard, *a, **k):  # module level: the task is pickled to the worker
    if shard.index == 1:
        raise OSError("worker lost its mount")
    return _REAL_SCORE_SHARD(shard, *a, **k)


def _cfg(data, out, seed, **kw) -> ScoreConfig:
    return ScoreConfig.of(datasets=(f"nih:{data}",), out=str(out), checkpoint=f"random:{seed}", arch=TINY_ARCH, cluster="inprocess",
                       cluster_file=CLUSTER_FILE, shard_size=8, batch_size=8, limit=16, **kw)


def test_steps_are_recorded_and_aggregates_run_on_the_scoring_cluster(tmp_path, tiny_nih, client, monkeypatch, caplog):
    from distributed import get_task_stream

    import pipeline.analysis.drift
    import pipeline.run.cluster

    out = OutputStore(str(tmp_path / "out"))
    with get_task_stream(client) as stream:
        first = lifecycle.run(cfg1 := _cfg(tiny_nih, out.url, 1, identifiability=True), client=client)
    assert first["status"] == "complete" and first["drift_text"] is None
    mv1 = first["model_version"]
    rj = out.read_json(out.run_json(mv1))
    # (tests skip the report, tests/conftest.py, and record it as `--no-report` does)
    assert rj["steps"] == {"prepare": "done", "scoring": "done", "aggregates": "done", "probes": "done", "publish": "done",
                           "report": "skipped"}
    assert rj["seconds"]["aggregates"] > 0 and rj["seconds"]["score_wall"] > 0
    prefixes = {t["key"].split("-")[0] for t in stream.data}
    # scoring, the region statistics' reduction and the per-cell probe fits: all on the same cluster
    assert {"score", "_partition_accumulator", "fit_cell"} <= prefixes
    assert client.status == "running"  # a client handed in stays open

    def no_cluster(*a, **k):
        raise AssertionError("a run with nothing to score or aggregate waited for a cluster")

    with monkeypatch.context() as m:  # the same run again: nothing to do, so it never waits for a cluster
        m.setattr(pipeline.run.cluster.ClusterStarter, "result", no_cluster)
        again = lifecycle.run(cfg1)  # (another aggregate section would make the aggregates stale)
    assert again["status"] == "complete" and again["counts"]["skipped_shards"] == 2

    second = lifecycle.run(_cfg(tiny_nih, out.url, 2), client=client)
    mv2 = second["model_version"]
    assert mv2 != mv1 and second["drift_text"].startswith(f"drift {mv1} -> {mv2}: 16 images compared")
    assert out.read_json(out.run_json(mv2))["steps"]["drift"] == "done"
    assert out.exists(out.drift_summary(mv1, mv2)) and out.read_json(out.latest)["model_version"] == mv2

    def broken(*a, **k):
        raise OSError("the disk went away")

    monkeypatch.setattr(pipeline.analysis.drift, "drift", broken)  # a failed drift: recorded, the run stays complete
    third = lifecycle.run(_cfg(tiny_nih, out.url, 3), client=client)
    mv3 = third["model_version"]
    assert third["status"] == "complete" and third["drift_text"] is None
    assert out.read_json(out.run_json(mv3))["steps"]["drift"] == "failed"
    assert out.read_json(out.latest)["model_version"] == mv3
    assert f"python -m jobs.drift --out {out.url} --from {mv2} --to {mv3}" in caplog.text


def test_an_incomplete_run_is_never_aggregated_or_published(tmp_path, tiny_nih, client, monkeypatch):
    out = OutputStore(str(tmp_path / "out"))
    monkeypatch.setattr(pipeline.worker.score_shard, "score_shard", _second_shard_fails)
    info = lifecycle.run(_cfg(tiny_nih, out.url, 6), client=client)
    assert info["status"] == "incomplete" and info["failed_shards"][0]["shard"] == 1
    rj = out.read_json(out.run_json(info["model_version"]))
    assert rj["steps"] == {"prepare": "done", "scoring": "incomplete"}
    assert not out.exists(out.latest) and not out.exists(out.table(info["model_version"], "region_stats"))
