"""The progress bar advances per batch, from the workers' events, and never over-counts."""

from pipeline.run.progress import ProgressBar, WorkerProgress, progress_topic
from pipeline.worker.score_shard import score_shard
from pipeline.run.scoring import ScoreConfig, prepare_run

from tests.conftest import TINY_ARCH


class FakeBar:
    def __init__(self):
        self.n = 0

    def update(self, k):
        self.n += k


class FakeClient:
    def subscribe_topic(self, topic, handler):
        self.handler = handler

    def unsubscribe_topic(self, topic):
        pass


def test_counts_are_absolute_so_late_or_reordered_events_do_not_over_count():
    bar, client = FakeBar(), FakeClient()
    p = ProgressBar(client, bar, "t")
    for done in (4, 12, 8):  # 8 arrives after 12
        client.handler((0.0, {"shard": 0, "done": done}))
    assert bar.n == 12
    p.shard_finished(0, 16)
    client.handler((0.0, {"shard": 0, "done": 16}))  # late event for a finished shard
    client.handler((0.0, {"shard": 1, "done": 4}))
    p.shard_finished(1, 10)
    assert bar.n == 26


def test_a_shard_task_reports_after_every_batch(tiny_nih, tiny_ckpt, tmp_path):
    import distributed  # a runtime dependency: never skipped
    cfg = ScoreConfig.of(datasets=(f"nih:{tiny_nih}",), out=str(tmp_path / "out"), checkpoint=tiny_ckpt, arch=TINY_ARCH,
                      shard_size=16, batch_size=4, cache="none", decode_workers=1, device="cpu")
    prep = prepare_run(cfg)
    shard = prep.shards[0]
    assert len(shard.rows) == 16
    topic = progress_topic(prep.spec.model_version)
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=":0") as client:
        record = client.submit(score_shard, shard, prep.spec, WorkerProgress(topic), pure=False).result()
        events = [msg for _, msg in client.get_events(topic)]
    assert record["n_scored"] == 16
    assert [e["done"] for e in events] == [4, 8, 12, 16] and {e["shard"] for e in events} == {shard.index}


def test_progress_outside_dask_is_a_no_op():
    WorkerProgress("t")(0, 5)  # no worker: nothing to do, no error
