"""run.json and shard records as typed records (schemas/records.py): files written before the
records had a version still read, and what does not match its declaration is refused."""

import json

import pytest

from schemas.records import RUN_RECORD_VERSION, SHARD_RECORD_VERSION, RecordError, RunRecord, ShardRecord, StaleRecord

from jobs.runs import list_runs
from pipeline.run.uptodate import record_rerun
from pipeline.store.bookkeeping import rebuild_latest
from pipeline.store.layout import OutputStore
from pipeline.store.run_index import complete_runs, read_run, write_run

# run.json as pipeline.run.scoring wrote it before it had a record_version (a complete run, published)
OLD_RUN = {
    "status": "complete", "model_version": "2451d1daf12ff14b", "precision": "fp32",
    "identity": {"model_version": "2451d1daf12ff14b", "findings": ["Atelectasis"], "baselines": [0.1], "shard_size": 16,
                 "grid": [7, 7], "embedding_dim": 32, "precision": "fp32", "preprocess": {"input_size": 224}},
    "config": {"datasets": ["nih:/data/nih"], "out": "/out", "checkpoint": "random:7", "storage_options": []},
    "resolved": {"baselines": {"Atelectasis": 0.1}, "cache": None, "device": "cpu"}, "model": {"findings": ["Atelectasis"]},
    "dataset_fingerprint": "0f3c", "code_version": "0.9.0+gabc", "torch_version": "2.5.1",
    "started": "2026-12-01T10:00:00.000001+00:00", "finished": "2026-12-01T10:01:40.000001+00:00",
    "counts": {"images": 120, "scored": 119, "failed": 1, "shards": 8}, "seconds": {"load_model": 1.5, "score_wall": 60.0},
    "failed_shards": [], "history": [], "steps": {"prepare": "done", "scoring": "done", "aggregates": "done", "publish": "done",
                                                   "report": "done"},
    "inputs": {"checkpoint": {"checkpoint": "random:7"}, "sources": "aa11"}, "report_inputs": "d1g35t",
}
# older still: before --precision, the model description, the inputs and the steps
OLDER_RUN = {"status": "complete", "model_version": "0badc0ffee000001", "identity": {"findings": ["Atelectasis"]},
             "config": {"datasets": ["nih:/data/nih"]}, "started": "2026-11-01T10:00:00+00:00",
             "finished": "2026-11-01T10:05:00+00:00", "counts": {"images": 10, "scored": 10, "failed": 0}, "seconds": {}}


def _write_old(store: OutputStore, run: dict) -> None:
    store.write_json(store.run_json(run["model_version"]), run)  # the old writer: the dict as it was


def test_a_run_json_written_before_the_version_reads_and_keeps_its_fields(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    _write_old(store, OLD_RUN)
    _write_old(store, OLDER_RUN)
    run, why = read_run(store, OLD_RUN["model_version"])
    assert why is None and run.status == "complete" and run.steps["publish"] == "done" and run.report_inputs == "d1g35t"
    assert run.to_json() == {**OLD_RUN, "record_version": RUN_RECORD_VERSION}  # the same keys and values, plus the version
    older, _ = read_run(store, OLDER_RUN["model_version"])
    assert older.precision is None and older.steps == {} and older.counts["scored"] == 10

    assert complete_runs(store) == [OLDER_RUN["model_version"], OLD_RUN["model_version"]]
    assert [(r["model_version"], r["scored"], r["seconds"]) for r in list_runs(store)] == [
        (OLDER_RUN["model_version"], 10, 300.0), (OLD_RUN["model_version"], 119, 100.0)]
    assert rebuild_latest(store) == OLD_RUN["model_version"]


def test_a_rerun_is_appended_to_an_old_run_json_leaving_the_run_as_it_was(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    _write_old(store, OLD_RUN)
    entry = {"started": "2026-12-02T09:00:00+00:00", "outcome": "nothing changed", "seconds": {"total": 0.2}}
    record_rerun(store, OLD_RUN["model_version"], entry, restamped="bb22")
    on_disk = json.loads(open(store.run_json(OLD_RUN["model_version"])).read())
    assert on_disk == {**OLD_RUN, "record_version": RUN_RECORD_VERSION, "reruns": [entry],
                       "inputs": {**OLD_RUN["inputs"], "sources": "bb22"}}


def test_unknown_keys_are_kept_and_a_newer_version_or_a_wrong_type_is_refused(tmp_path):
    store = OutputStore(str(tmp_path / "out"))
    write_run(store, RunRecord.from_json({**OLD_RUN, "written_by_a_later_step": [1, 2]}))
    assert read_run(store, OLD_RUN["model_version"])[0].extra == {"written_by_a_later_step": [1, 2]}
    for bad, said in (({**OLD_RUN, "record_version": RUN_RECORD_VERSION + 1}, "newer than this cxr-audit reads"),
                      ({**OLD_RUN, "counts": [119]}, "'counts' is list"), ({"status": "complete"}, "without 'model_version'"),
                      ([OLD_RUN], "is a JSON object")):
        store.write_json(store.run_json("v-bad"), bad)
        run, why = read_run(store, "v-bad")
        assert run is None and said in why
    assert read_run(store, "v-absent") == (None, None)


SHARD = {"record_version": SHARD_RECORD_VERSION, "status": "partial", "shard": 3, "start": 48, "stop": 64, "digest": "d3",
         "model_version": "v1", "n_images": 16, "n_scored": 15, "n_failed": 1, "source_modes": {"L": 15}, "cache": None,
         "errors": [{"row": 50, "image_id": "a.png", "path": "/d/a.png", "stage": "read", "error_class": "OSError", "message": "gone"}],
         "sources": {"48": "1234:abcd"}, "seconds": {"decode_wait": 0.1, "forward": 0.5, "write": 0.1, "total": 0.8},
         "device": "cpu", "torch_threads": 2, "decode_workers": 2, "decode_pool_restarts": 0, "decode_processes_replaced": 0,
         "precision": "fp32", "outputs": {"part": {"bytes": 10, "rows": 15, "sha256": "ff"}, "chunks": {"cam": None}}}


def test_a_shard_record_round_trips_and_an_early_one_of_its_version_still_reads():
    assert ShardRecord.from_json(SHARD).to_json() == SHARD
    # version 2 before it kept sources, decode workers, pool restarts and precision (it had decode_threads)
    early = {k: v for k, v in SHARD.items() if k not in ("sources", "decode_workers", "decode_pool_restarts",
                                                          "decode_processes_replaced", "precision")}
    rec = ShardRecord.from_json({**early, "decode_threads": 4})
    assert rec.sources == {} and rec.decode_workers is None and rec.errors == SHARD["errors"]


def test_a_shard_record_of_another_version_is_stale_and_one_missing_a_field_is_refused():
    with pytest.raises(StaleRecord, match="record version 1"):
        ShardRecord.from_json({**SHARD, "record_version": 1})
    with pytest.raises(StaleRecord):
        ShardRecord.from_json({k: v for k, v in SHARD.items() if k != "record_version"})
    with pytest.raises(RecordError, match="without 'outputs'"):
        ShardRecord.from_json({k: v for k, v in SHARD.items() if k != "outputs"})
    with pytest.raises(RecordError, match="'n_scored' is str"):
        ShardRecord.from_json({**SHARD, "n_scored": "15"})
