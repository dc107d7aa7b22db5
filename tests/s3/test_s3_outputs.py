"""Outputs on a real S3 server (SeaweedFS, tests/s3/server.py): a run with --out s3://... is
complete and bit-identical to the same run on local disk, a rerun is a no-op (also with the
credentials and endpoint taken from the environment, as botocore users set them), the query recipes
read it from S3, no credential is written or printed, and the lock has one holder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.score_dataset import main
from tests.conftest import TINY_ARCH
from tests.s3.compare import assert_same_outputs, objects
from tests.s3.server import OUTPUT_BUCKET

ROOT = Path(__file__).resolve().parents[2]


def _args(data, ckpt: str) -> list[str]:
    return ["--dataset", f"nih:{data}", "--checkpoint", ckpt, "--arch", TINY_ARCH, "--shard-size", "8",
            "--batch-size", "4", "--cluster", "inprocess", "--cache", "none", "--no-report", "--decode-workers", "0"]


# The README's pandas / pyarrow / zarr recipe for outputs on S3 (README "Object storage end to end"),
# run as written but for its OUT, OPTS line: they are bound to this run's prefix and options.
README = Path(__file__).resolve().parents[2] / "README.md"


def _readme_recipe() -> str:
    section = README.read_text().split("### Object storage end to end", 1)[1]
    block = section.split("```python\n", 1)[1].split("```", 1)[0]
    lines = block.splitlines()
    assert any(line.startswith("OUT, OPTS = ") for line in lines), "the README's recipe no longer names OUT, OPTS"
    return "\n".join(line for line in lines if not line.startswith("OUT, OPTS = "))


def test_run_on_s3_equals_local_disk_and_a_rerun_is_a_no_op(s3_server, prefix, tiny_nih, tiny_ckpt, tmp_path, capsys, monkeypatch):
    out = f"s3://{OUTPUT_BUCKET}/{prefix}"
    opts = s3_server.options("outputs")
    args = _args(tiny_nih, tiny_ckpt)
    assert main([*args, "--out", out, *s3_server.flags("outputs")]) == 0
    first = capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "local")]) == 0
    capsys.readouterr()
    assert_same_outputs(out, opts, str(tmp_path / "local"))
    run_json = json.loads(s3_server.fs().cat(f"{OUTPUT_BUCKET}/{prefix}/{json.loads(s3_server.fs().cat(f'{OUTPUT_BUCKET}/{prefix}/latest.json'))['run']}/run.json"))
    assert run_json["status"] == "complete" and run_json["counts"]["scored"] == 40
    assert not s3_server.fs().exists(f"{OUTPUT_BUCKET}/{prefix}/_lock.json")  # released

    # The rerun takes credentials and endpoint from the environment (no storage option): nothing to do,
    # and not one object under --out written again but run.json, which records the rerun.
    before = objects(s3_server.fs(), f"{OUTPUT_BUCKET}/{prefix}")
    for k, v in s3_server.env("outputs").items():
        monkeypatch.setenv(k, v)
    assert main([*args, "--out", out]) == 0
    again = capsys.readouterr()
    assert again.out.startswith("nothing changed"), again.out + again.err[-2000:]
    after = objects(s3_server.fs(), f"{OUTPUT_BUCKET}/{prefix}")
    rerun_json = [p for p in after if p.endswith("/run.json")]
    assert {p: e for p, e in after.items() if p not in rerun_json} == {p: e for p, e in before.items() if p not in rerun_json}
    assert [r["outcome"] for r in json.loads(s3_server.fs().cat(rerun_json[0]))["reruns"]] == ["nothing changed"]

    # The query recipes read the outputs on S3.
    scope = {"OUT": out, "OPTS": opts}
    exec(_readme_recipe(), scope)  # noqa: S102 - the README's text, run as written
    assert len(scope["preds"]) == 40 and scope["cam"].shape == (40, 7, 7)
    assert set(scope["by_view"].index) <= {"AP", "PA"} and scope["by_view"].notna().all()

    # No credential in any object under --out, nor in anything printed.
    fs = s3_server.fs()
    written = b"".join(fs.cat(p) for p in before)
    for secret in s3_server.secrets():
        assert secret.encode() not in written
        assert secret not in first.out + first.err + again.out + again.err


def test_the_lock_has_one_holder_between_two_starters(s3_server, prefix):
    """Two processes start on the same --out at the same instant, 20 times: each time exactly one holds it."""
    out = f"s3://{OUTPUT_BUCKET}/{prefix}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.s3.lock_starter", out], cwd=ROOT, env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]

    def ask(p, line: str) -> str:
        p.stdin.write(line + "\n")
        p.stdin.flush()
        answer = p.stdout.readline().strip()
        assert answer, p.stderr.read()[-3000:]
        return answer

    try:
        for p in procs:
            p.stdin.write(json.dumps(s3_server.options("outputs")) + "\n")
        for _ in range(20):
            at = time.time() + 0.5
            for p in procs:
                p.stdin.write(f"go {at}\n")
                p.stdin.flush()
            answers = [p.stdout.readline().strip() for p in procs]
            assert sum(a == "held" for a in answers) == 1, answers
            assert all(a == "held" or a.startswith("refused another run is writing to") for a in answers), answers
            assert [ask(p, "release") for p in procs] == ["released"] * 2
            assert not s3_server.fs().exists(f"{OUTPUT_BUCKET}/{prefix}/_lock.json")
    finally:
        for p in procs:
            p.stdin.close()
            p.wait(30)


def test_the_lock_trusts_this_server_and_refuses_a_live_holder(s3_server, prefix):
    from pipeline.run.run_lock import LockError, one_holder_caveat, run_lock
    from pipeline.store.layout import OutputStore

    store = OutputStore(f"s3://{OUTPUT_BUCKET}/{prefix}", s3_server.options("outputs"))
    assert one_holder_caveat(store) is None  # SeaweedFS refuses a second If-None-Match create
    with run_lock(store):
        holder = store.read_json(store.lock)
        assert holder["pid"] == os.getpid()
        with pytest.raises(LockError, match="another run is writing"):
            with run_lock(OutputStore(store.url, s3_server.options("outputs"))):
                pass
    left = set(s3_server.fs().find(f"{OUTPUT_BUCKET}/{prefix}")) - {f"{OUTPUT_BUCKET}/{prefix}"}  # SeaweedFS keeps the folder
    assert left == set()  # the lock released, the probe removed


def test_a_shard_record_sees_chunks_zarr_wrote_after_a_cached_listing(s3_server, prefix):
    """zarr writes through its own (async) s3fs instance; the record's read-back goes through the
    job's. A listing the job's instance cached before the write must not hide the new chunk (it
    did: records said 'only fill values', and every resume rescored those shards as damaged)."""
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zarr

    from pipeline.store.shard_check import fingerprint_outputs

    opts = s3_server.options("outputs")
    maps, part = f"s3://{OUTPUT_BUCKET}/{prefix}/maps.zarr", f"s3://{OUTPUT_BUCKET}/{prefix}/part.parquet"
    arr = zarr.open_group(maps, mode="w", storage_options=opts).create_array("x", shape=(4,), chunks=(2,), dtype="i4", fill_value=0)
    arr[0:2] = [1, 2]
    with fsspec.open(part, "wb", **opts) as f:
        pq.write_table(pa.table({"row": [2, 3]}), f)
    fs, _ = fsspec.core.url_to_fs(maps, **opts)  # the job's (cached) instance
    assert fs.ls(f"{OUTPUT_BUCKET}/{prefix}/maps.zarr/x/c") == [f"{OUTPUT_BUCKET}/{prefix}/maps.zarr/x/c/0"]
    arr[2:4] = [3, 4]
    assert fingerprint_outputs(part, maps, 2, opts)["chunks"]["x"] is not None


def test_where_one_holder_is_not_guaranteed_the_run_is_told(s3_server, prefix, monkeypatch, caplog):
    """An S3 server that ignores If-None-Match (simulated: the header is dropped before it is sent)
    and a backend with no known atomic create each get the caveat, logged when the lock is taken."""
    import fsspec
    import s3fs
    from fsspec.implementations.memory import MemoryFileSystem

    from pipeline.run.run_lock import acquire, one_holder_caveat, release
    from pipeline.store.layout import OutputStore

    real = s3fs.S3FileSystem._call_s3

    async def ignoring_the_condition(self, method, *args, **kwargs):
        kwargs.pop("IfNoneMatch", None)
        return await real(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", ignoring_the_condition)
    monkeypatch.setattr(s3fs.S3FileSystem, "call_s3", fsspec.asyn.sync_wrapper(ignoring_the_condition))
    store = OutputStore(f"s3://{OUTPUT_BUCKET}/{prefix}", s3_server.options("outputs"))
    with caplog.at_level("WARNING", logger="pipeline.run.run_lock"):
        me, _ = acquire(store)
        release(store, me)
    assert "cannot guarantee one holder (this S3 server overwrote an object despite If-None-Match: *)" in caplog.text
    monkeypatch.undo()
    assert one_holder_caveat(store) is None

    class PlainFileSystem(MemoryFileSystem.__base__):  # fsspec's AbstractFileSystem: "xb" is up to the backend
        protocol = "plainfs"

    fsspec.register_implementation("plainfs", PlainFileSystem, clobber=True)
    assert "plainfs:// has no conditional create known to be atomic" in one_holder_caveat(OutputStore("plainfs://x"))
