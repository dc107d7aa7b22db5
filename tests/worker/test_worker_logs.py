"""Worker logs land in OUT/logs/ (the job's LocalCluster run is checked in test_job.py)."""

import logging

import fsspec
import pytest

from pipeline.worker.logs import install_worker_logs, log_name


def _log_from_task(text):
    logging.getLogger("pipeline.some_step").info(text)
    logging.getLogger("pipeline.some_step").debug("debug detail")  # below INFO: not written
    return text


def _fail_on_worker():
    raise RuntimeError("this task fails https://user:secret@host/x.png")


@pytest.fixture
def threads_client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, Client(cluster) as client:
        yield client


def test_each_in_process_worker_logs_only_its_own_tasks_and_failures(tmp_path, threads_client):
    client = threads_client
    logs = tmp_path / "out" / "logs"
    names = {w["name"]: a for a, w in client.scheduler_info()["workers"].items()}
    with install_worker_logs(client, str(logs)):
        for name, addr in names.items():
            assert client.submit(_log_from_task, f"hello from a task on {name}", workers=[addr], pure=False).result()
        failed = client.submit(_fail_on_worker, workers=[next(iter(names.values()))], pure=False)
        with pytest.raises(RuntimeError):
            failed.result()
        logging.getLogger("pipeline.driver").warning("the driver's own record")  # no task: not a worker's
    assert sorted(p.name for p in logs.iterdir()) == sorted(log_name(n) for n in names)
    first = next(iter(names))
    for name in names:
        text = (logs / log_name(name)).read_text()
        assert f"logs to {logs / log_name(name)}" in text  # the header line of this worker's start
        assert f"hello from a task on {name}" in text
        assert not [o for o in names if o != name and f"task on {o}" in text], text  # only its own tasks
        assert "debug detail" not in text and "the driver's own record" not in text
        assert ("this task fails" in text) == (name == first)
        assert "secret" not in text  # URLs in messages are redacted
    # closed: the plugin is off the workers, so nothing more is written
    client.submit(_log_from_task, "after close", pure=False).result()
    assert all("after close" not in (logs / log_name(n)).read_text() for n in names)


def test_object_store_logs_are_written_whole_when_closed(threads_client):
    client = threads_client
    url = "memory://cxr-worker-logs/out/logs"
    fs = fsspec.filesystem("memory")
    try:
        with install_worker_logs(client, url):
            client.submit(_log_from_task, "stored in an object", pure=False).result()
        files = fs.ls("/cxr-worker-logs/out/logs", detail=False)
        assert len(files) == 2 and all(f.rsplit("/", 1)[1].startswith("worker-") for f in files)
        texts = [fs.cat(f).decode() for f in files]
        assert sum("stored in an object" in t for t in texts) == 1
        assert not [f for f in files if ".tmp-" in f]  # written atomically
    finally:
        if fs.exists("/cxr-worker-logs"):
            fs.rm("/cxr-worker-logs", recursive=True)


def test_an_unwritable_log_folder_does_not_fail_the_work(tmp_path, threads_client, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the logs folder should go
    with caplog.at_level(logging.WARNING, "pipeline.worker.logs"), install_worker_logs(threads_client, str(blocker / "logs")):
        assert threads_client.submit(_log_from_task, "still runs", pure=False).result() == "still runs"
    assert "its logs stay on its stderr" in caplog.text
