"""The output layout as one object (pipeline/store/layout.py): its paths are the public contract,
its writes are whole, its lock is exclusive on every backend, and its storage options travel."""

from __future__ import annotations

import json
import pickle
import re
import threading
from pathlib import Path

import fsspec
import pytest

from pipeline.core.errors import OutputError
from pipeline.store.layout import OutputStore

from tests import guarded_fs

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture
def guarded():
    guarded_fs.register()
    guarded_fs.clear()
    yield OutputStore("guarded://bucket/out", guarded_fs.OPTIONS)
    guarded_fs.clear()


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path):
    if request.param == "local":
        yield OutputStore(str(tmp_path / "out"))
        return
    url = f"memory://layout-{id(request)}/out"
    yield OutputStore(url)
    fs, path = fsspec.core.url_to_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def test_every_contract_path_is_named_once():
    s = OutputStore("s3://bucket/audit/", {"anon": False})
    assert s.url == "s3://bucket/audit" and s.options == {"anon": False}
    named = {
        s.manifest: "manifest.parquet", s.manifest_issues: "manifest_issues.parquet", s.latest: "latest.json",
        s.views: "cxr_audit.sql", s.lock: "_lock.json", s.cache_root: "cache", s.logs: "logs",
        s.run_dir("v1"): "runs/v1", s.run_json("v1"): "runs/v1/run.json", s.maps("v1"): "runs/v1/maps.zarr",
        s.part("v1", 3): "runs/v1/predictions/part-000003.parquet", s.record("v1", 12): "runs/v1/_shards/shard-000012.json",
        s.errors("v1"): "runs/v1/errors.parquet", s.table("v1", "region_stats"): "runs/v1/region_stats.parquet",
        s.aggregate_inputs("v1"): "runs/v1/_aggregates.json", s.report("v1"): "runs/v1/report.html",
        s.film("v1", "00000001_000-Cardiomegaly"): "runs/v1/films/00000001_000-Cardiomegaly.png",
        s.resolved_config("v1"): "runs/v1/config.yaml",
        s.drift_table("v1", "v2", "finding_drift"): "drift/v1__v2/finding_drift.parquet",
        s.drift_summary("v1", "v2"): "drift/v1__v2/summary.json",
    }
    for url, rel in named.items():
        assert url == f"s3://bucket/audit/{rel}"
    assert s.latest_entry("v2", "t") == {"model_version": "v2", "run": "runs/v2", "finished": "t"}
    # the README's contract lists the same names
    contract = README.read_text().split("## Outputs: the public contract", 1)[1].split("```", 2)[1]
    for name in ("manifest.parquet", "manifest_issues.parquet", "latest.json", "cxr_audit.sql", "_lock.json",
                 "predictions/part-<shard>.parquet", "maps.zarr/", "errors.parquet", "report.html", "run.json",
                 "_shards/shard-<k>.json", "_aggregates.json", "OUT/drift/<from>__<to>/", "OUT/cache/"):
        assert name in contract, name


def test_store_is_a_small_frozen_value():
    a = OutputStore("memory://x/out/", {"b": 1, "a": "2"})
    assert a == OutputStore("memory://x/out", (("a", "2"), ("b", 1))) and hash(a) == hash(pickle.loads(pickle.dumps(a)))
    assert OutputStore.of(a) is a and OutputStore.of("memory://x/out", {"a": "2", "b": 1}) == a
    with pytest.raises(ValueError, match="already carries"):
        OutputStore.of(a, {"a": "other"})
    assert OutputStore.of(Path("rel/out")).url == "rel/out"
    assert OutputStore("rel/out").absolute().url == str(Path("rel/out").resolve())


def test_writes_are_whole_and_leave_no_temporary(store):
    store.write_json(store.run_json("v1"), {"status": "running"})
    store.write_json(store.run_json("v1"), {"status": "complete"})
    assert store.read_json(store.run_json("v1")) == {"status": "complete"}
    fs, root = store.fs()
    assert [p for p in fs.find(root) if ".tmp-" in p] == []
    assert store.model_versions() == ["v1"]
    assert store.read_json_safe(store.latest) == (None, None)


def test_a_failed_write_leaves_neither_file_nor_temporary(store, monkeypatch):
    fs, _ = store.fs()
    store.write_json(store.latest, {"model_version": "old"})

    def broken_mv(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(fs), "mv", broken_mv)
    with pytest.raises(OutputError, match="free space"):
        store.write_json(store.latest, {"model_version": "new"})
    monkeypatch.undo()
    assert store.read_json(store.latest) == {"model_version": "old"}  # the old file is untouched
    assert [p for p in fs.find(store.fs()[1]) if ".tmp-" in p] == []


def test_exclusive_create_has_one_winner(store):
    results = []
    barrier = threading.Barrier(8)

    def take(i):
        barrier.wait()
        results.append((i, store.create_exclusive(store.lock, json.dumps({"who": i}).encode())))

    threads = [threading.Thread(target=take, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, won in results if won]
    assert len(winners) == 1
    assert store.read_json(store.lock) == {"who": winners[0]}  # whole, and the winner's
    assert not store.create_exclusive(store.lock, b"{}")
    assert store.remove(store.lock) and store.create_exclusive(store.lock, b"{}")


def test_run_lock_on_an_object_store(store):
    from pipeline.run.run_lock import LockError, run_lock

    with run_lock(store):
        holder = store.read_json(store.lock)
        assert holder["pid"] > 0 and holder["token"]
        with pytest.raises(LockError, match="another run is writing"):
            with run_lock(store.url):
                pass
    assert not store.exists(store.lock)


def test_guarded_filesystem_refuses_without_its_option(guarded):
    guarded.write_json(guarded.latest, {"model_version": "v"})
    assert guarded.read_json(guarded.latest) == {"model_version": "v"}
    with pytest.raises(PermissionError, match="options were dropped"):
        OutputStore(guarded.url).read_json(guarded.latest)


def test_storage_options_travel_to_aggregate_drift_report_and_index(guarded, tiny_nih, tiny_ckpt, report_after_run):
    """Score two model versions on a filesystem that needs its storage option, then aggregate,
    compare, report, list and check them with the store: any step that dropped the options fails."""
    from pipeline.analysis.aggregate import AggregateConfig, aggregate_run
    from pipeline.analysis.aggregate_inputs import stale_aggregates
    from pipeline.analysis.drift import drift
    from pipeline.reporting.html import write_report
    from pipeline.run.run_check import check_out
    from pipeline.run.lifecycle import run
    from pipeline.run.scoring import ScoreConfig
    from pipeline.store.run_index import complete_runs, run_records

    from tests.conftest import TINY_ARCH

    cluster_file = str(Path(__file__).resolve().parents[2] / "cluster.yaml")
    infos = []
    for seed in (1, 2):
        cfg = ScoreConfig.of(datasets=(f"nih:{tiny_nih}",), out=guarded.url, checkpoint=f"random:{seed}", arch=TINY_ARCH,
                          cluster="inprocess", cluster_file=cluster_file, shard_size=8, batch_size=8, limit=16,
                          storage_options=dict(guarded.options))
        infos.append(run(cfg))
    assert [i["status"] for i in infos] == ["complete", "complete"]
    v1, v2 = (i["model_version"] for i in infos)
    assert v1 != v2 and complete_runs(guarded) == [v1, v2]
    assert guarded.read_json(guarded.latest)["model_version"] == v2
    assert infos[1]["report"] == guarded.report(v2) and guarded.exists(guarded.report(v2))  # the report hook had the options
    assert guarded.exists(guarded.drift_table(v1, v2, "finding_drift"))  # so had drift, at the end of the run
    assert guarded.exists(guarded.part(v1, 0)) and guarded.exists(guarded.record(v2, 1))

    # the same steps by hand, each given the store (or the URL and its options)
    tables = aggregate_run(guarded, v1, AggregateConfig(n_boot=50))
    assert tables["region_stats"].num_rows > 0 and guarded.exists(guarded.table(v1, "region_stats"))
    assert stale_aggregates(guarded, v1, AggregateConfig(n_boot=50)) is None
    moved = drift(guarded.url, v1, v2, storage_options=dict(guarded.options))
    assert moved["summary"]["images_compared"] == 16
    assert write_report(guarded.url, v1, storage_options=dict(guarded.options)) == guarded.report(v1)
    assert [r.model_version for r in run_records(guarded)] == [v1, v2]
    assert check_out(guarded) == []

    # and without the options, each of them is refused
    bare = OutputStore(guarded.url)
    for step in (lambda: aggregate_run(bare, v1), lambda: drift(bare, v1, v2), lambda: write_report(bare, v1),
                 lambda: run_records(bare), lambda: check_out(bare)):
        with pytest.raises(PermissionError):
            step()
    leftovers = [p for p in guarded.fs()[0].find(guarded.fs()[1]) if re.search(r"\.tmp-|\.break-", p)]
    assert leftovers == [] and not guarded.exists(guarded.lock)


@pytest.mark.parametrize("root", ["local", "memory"])
def test_temporaries_are_looked_for_outside_the_zarr_stores_only(tmp_path, root):
    """The clean-up before a run walks --out but not the Zarr stores (maps.zarr, the cache: 224k
    files at 112k films took 21 s to list), where only zarr writes: a leftover of the job's own
    writers is removed anywhere else, a user's look-alike is kept."""
    from pipeline.store.storage import temp_name

    store = OutputStore(str(tmp_path / "out") if root == "local" else f"memory://prune-{tmp_path.name}/out")
    fs, base = store.fs()
    leftover = temp_name(f"{base}/runs/v1/predictions/part-000000.parquet")
    users = f"{base}/runs/v1/notes.tmp-1"
    inside = [temp_name(f"{base}/cache/abc/pixels/c/0/0"), temp_name(f"{base}/runs/v1/maps.zarr/cam/c/0"),
              temp_name(f"{base}/_scratch/dask/x")]
    for p in [leftover, users, *inside]:
        fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe(p, b"x")
    assert store.remove_temp_files() == 1
    assert not fs.exists(leftover) and fs.exists(users)
    assert all(fs.exists(p) for p in inside)  # never walked: nothing of the job's own is written there
