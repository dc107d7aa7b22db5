"""The progress bar advances per batch, from the workers' events (and only theirs), and never over-counts."""

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


def test_a_shard_task_reports_after_every_batch_and_the_bar_follows(tiny_nih, tiny_ckpt, tmp_path):
    """The events a shard task logs (one per batch, absolute counts) and the progress line the driver
    draws from them, through a real scheduler's topic: the bar reaches the shard's size from the
    events alone, before the driver tops it up at the task's end."""
    import io
    import time

    import distributed  # a runtime dependency: never skipped
    from tqdm import tqdm

    cfg = ScoreConfig.of(datasets=(f"nih:{tiny_nih}",), out=str(tmp_path / "out"), checkpoint=tiny_ckpt, arch=TINY_ARCH,
                         shard_size=16, batch_size=4, cache="none", decode_workers=1, device="cpu")
    prep = prepare_run(cfg)
    shard = prep.shards[0]
    assert len(shard.rows) == 16
    topic = progress_topic(prep.spec.model_version)
    text = io.StringIO()
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=":0") as client:
        with tqdm(total=16, unit="img", desc="scoring", file=text, mininterval=0, miniters=1) as bar:
            progress = ProgressBar(client, bar, topic)
            record = client.submit(score_shard, shard, prep.spec, WorkerProgress(topic), pure=False).result()
            WorkerProgress(topic)(shard.index, 99)  # outside a Dask worker (this thread): logs nothing
            deadline = time.monotonic() + 60  # the events reach the subscriber asynchronously
            while bar.n < 16 and time.monotonic() < deadline:
                time.sleep(0.05)
            from_events = bar.n
            progress.shard_finished(shard.index, 16)
            progress.close()
        events = [msg for _, msg in client.get_events(topic)]
    assert record["n_scored"] == 16
    # one event per batch; none from the call outside a worker
    assert [e["done"] for e in events] == [4, 8, 12, 16] and {e["shard"] for e in events} == {shard.index}
    assert from_events == 16 and bar.n == 16  # from the events alone; the top-up adds nothing
    lines = text.getvalue().replace("\r", "\n")
    for n in (4, 8, 12, 16):
        assert f"| {n}/16 [" in lines, lines
    assert "scoring: 100%" in lines and "/16 [" in lines
