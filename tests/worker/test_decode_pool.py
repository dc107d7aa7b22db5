"""Decode processes: every film exactly once, in spite of dead decode processes and bad films."""

import multiprocessing
import os
import signal
import time

import numpy as np

from pipeline.worker.decode_pool import DecodePool, DecodeTask, Failure, FilmJob
from pipeline.inference.images import load_image

from tests.decode_helpers import SlowTask, decode_in_daemon, own_a_shared_pool, start_pool_then_report


def _collect(pool, task, paths, **kw):
    with pool.stream(task, [FilmJob(i, p) for i, p in enumerate(paths)], **kw) as s:
        return [(job.pos, result) for job, (result, _key) in s]


def test_grayscale_films_cross_as_one_plane_when_asked(films):
    paths, _ = films
    pool = DecodePool(1)
    try:
        got = dict(_collect(pool, DecodeTask(gray_plane=True), paths[:3], window=3))
    finally:
        pool.close()
    for i, p in enumerate(paths[:3]):
        assert got[i].pixels.shape == (224, 224) and got[i].source_mode == "L"
        np.testing.assert_array_equal(got[i].rgb(), load_image(p).pixels)


def test_every_film_once_and_identical_to_in_process_decoding(films):
    paths, bad = films
    pool = DecodePool(2)
    try:
        got = _collect(pool, DecodeTask(), paths + [bad], window=5)
    finally:
        pool.close()
    assert sorted(p for p, _ in got) == list(range(len(paths) + 1))
    by_pos = dict(got)
    for i, p in enumerate(paths):
        np.testing.assert_array_equal(by_pos[i].pixels, load_image(p).pixels)
    assert isinstance(by_pos[len(paths)], Failure) and by_pos[len(paths)].stage == "decode"
    assert by_pos[len(paths)].error_class == "UnidentifiedImageError"


def _slot_block_fds() -> list[int]:
    """This process's descriptors of decode-slot memory files (what the OS shows of a pool's block)."""
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:cxr-audit-decode-slots"):
                fds.append(int(fd))
        except OSError:
            pass  # closed meanwhile (the listing's own descriptor)
    return fds


def _in_slots(fds: list[int], films: list[np.ndarray]) -> list[bool]:
    """For each film: are its pixels at the start of a slot of one of these memory files (read through
    /proc, as a decode process opens them)?"""
    from pipeline.worker.decode_pool import SLOT_BYTES

    found, inodes = [], set()
    for fd in fds:  # (mmap holds a duplicate of each descriptor)
        if os.stat(f"/proc/self/fd/{fd}").st_ino in inodes:
            continue
        inodes.add(os.stat(f"/proc/self/fd/{fd}").st_ino)
        with open(f"/proc/self/fd/{fd}", "rb") as f:
            rows = np.frombuffer(f.read(), np.uint8).reshape(-1, SLOT_BYTES)
        found.append({rows[k, :n].tobytes() for n in {a.nbytes for a in films} for k in range(len(rows))})
    return [any(a.tobytes() in seen for seen in found) for a in films]


def test_chunks_of_films_come_back_through_shared_memory(films):
    """Films go several per task and their pixels through the executor's shared block: every film
    once, the same pixels as in-process decoding, every film's pixels in the block (an anonymous
    memory file: nothing in /dev/shm), the block gone on close."""
    paths, bad = films
    shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    fds_before = _slot_block_fds()
    pool = DecodePool(2)
    try:
        with pool.stream(DecodeTask(gray_plane=True), [FilmJob(i, p) for i, p in enumerate(paths + [bad])], window=7, chunk=5) as s:
            got = {job.pos: result for job, (result, _key) in s}
        block = [fd for fd in _slot_block_fds() if fd not in fds_before]
        assert len({os.stat(f"/proc/self/fd/{fd}").st_ino for fd in block}) == 1  # one memory file (and its mmap's dup): no name to leak
        assert all(_in_slots(block, [got[i].pixels for i in range(len(paths))]))  # every film came through it, not the pipe
    finally:
        pool.close()
    assert not [fd for fd in _slot_block_fds() if fd not in fds_before]  # gone with the pool
    if shm_before:
        assert not {n for n in set(os.listdir("/dev/shm")) - shm_before if n.startswith("psm_")}
    assert sorted(got) == list(range(len(paths) + 1)) and isinstance(got[len(paths)], Failure)
    for i, p in enumerate(paths):
        np.testing.assert_array_equal(got[i].rgb(), load_image(p).pixels)


def test_streams_closed_early_give_back_every_slot(films, tmp_path, rng):
    """A shard task that stops reading (an error, a cancelled task) closes its stream with chunks in
    flight: their slots are freed once no decode process can still write them, so the long-lived
    shared pool does not run out of slots. Twenty such streams close with ~16 films each still in
    flight (decoding slowly) or queued, more than the block's SLOTS in all: were their slots lost, most
    films of a later stream would come back through the pipe, and their pixels be missing from the block."""
    from pipeline.worker.decode_pool import SLOTS

    from tests.conftest import png_bytes

    paths, _ = films
    fresh = []  # films no earlier stream decoded: their pixels are in the block only if the last stream put them there
    for i in range(24):
        p = tmp_path / f"fresh{i}.png"
        p.write_bytes(png_bytes(rng.integers(0, 256, (90 + i, 70), dtype=np.uint8)))
        fresh.append(str(p))
    assert 20 * 16 > SLOTS
    fds_before = _slot_block_fds()
    pool = DecodePool(2)
    try:
        for _ in range(20):
            with pool.stream(SlowTask(delay=0.01, gray_plane=True), [FilmJob(i, p) for i, p in enumerate(paths)], window=24, chunk=4) as s:
                next(iter(s))  # one film taken, the rest in flight, queued, or decoded but not taken
        # the chunks still in flight give their slots back as they finish: unless slots were lost,
        # the block soon has room for all of these films
        deadline, ok = time.monotonic() + 60, False
        while not ok and time.monotonic() < deadline:
            got = dict(_collect(pool, DecodeTask(gray_plane=True), fresh, window=24, chunk=4))
            ok = all(_in_slots([fd for fd in _slot_block_fds() if fd not in fds_before], [got[i].pixels for i in range(24)]))
        assert ok and pool.restarts == 0
    finally:
        pool.close()
    for i, p in enumerate(fresh):
        np.testing.assert_array_equal(got[i].rgb(), load_image(p).pixels)


def test_a_decode_process_killed_mid_batch_loses_no_film_and_duplicates_none(films):
    paths, _ = films
    pool = DecodePool(2)
    try:
        with pool.stream(SlowTask(), [FilmJob(i, p) for i, p in enumerate(paths)], window=8) as s:
            got, killed = [], False
            for job, (result, _key) in s:
                got.append((job.pos, result))
                if len(got) == 3 and not killed:
                    os.kill(pool.pids()[0], signal.SIGKILL)  # films are in flight in both processes
                    killed = True
        assert killed and pool.restarts >= 1
    finally:
        pool.close()
    positions = [p for p, _ in got]
    assert sorted(positions) == list(range(len(paths)))  # none lost, none twice
    for pos, result in got:
        np.testing.assert_array_equal(result.pixels, load_image(paths[pos]).pixels)


def test_a_film_that_kills_its_decode_process_is_recorded_and_the_rest_are_decoded(films):
    paths, _ = films
    poison = paths[4]
    pool = DecodePool(2)
    try:
        got = dict(_collect(pool, SlowTask(delay=0.0, poison=poison), paths, window=6))
    finally:
        pool.close()
    assert sorted(got) == list(range(len(paths)))
    assert isinstance(got[4], Failure) and got[4].stage == "decode" and got[4].error_class == "DecodeWorkerDied"
    assert all(not isinstance(r, Failure) for i, r in got.items() if i != 4)


def test_cache_hit_is_answered_without_decoding(films):
    from pathlib import Path

    from pipeline.worker.cache import content_key

    def source_key(p):
        return content_key(p, Path(p).read_bytes())

    paths, _ = films
    pool = DecodePool(1)
    try:
        jobs = [FilmJob(0, paths[0], source_key(paths[0])), FilmJob(1, paths[1], "stale|1|2")]
        with pool.stream(DecodeTask(use_cache=True), jobs, window=4) as s:
            got = {job.pos: r for job, r in s}
    finally:
        pool.close()
    assert got[0] == (None, source_key(paths[0]))  # hit: no pixels travel back
    assert got[1][0].pixels.shape == (224, 224, 3) and got[1][1] == source_key(paths[1])


def test_decode_processes_start_inside_a_daemonic_process(films):
    """Dask's nanny starts workers as daemons; multiprocessing refuses them children by default."""
    paths, _ = films
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=decode_in_daemon, args=(paths[0], q), daemon=True)
    proc.start()
    try:
        assert q.get(timeout=120) == [(224, 224, 3)]
    finally:
        proc.join(30)
    assert proc.exitcode == 0


def test_zero_workers_decodes_in_process(films):
    paths, bad = films
    got = dict(_collect(DecodePool(0), DecodeTask(), paths[:3] + [bad], window=2))
    assert sorted(got) == [0, 1, 2, 3] and isinstance(got[3], Failure)


def test_decode_processes_exit_when_their_owner_is_killed(films):
    paths, _ = films
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    owner = ctx.Process(target=start_pool_then_report, args=(paths[0], q))
    owner.start()
    pids = q.get(timeout=120)
    assert len(pids) >= 1  # processes start on demand
    os.kill(owner.pid, signal.SIGKILL)
    owner.join(30)
    deadline = time.time() + 30
    alive = list(pids)
    while alive and time.time() < deadline:
        time.sleep(0.2)
        alive = [p for p in alive if _running(p)]
    assert not alive, f"decode processes {alive} outlived their owner"


def _running(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_process_owning_the_shared_pool_exits_promptly(films):
    """At a multiprocessing child's exit, multiprocessing joins its children (the decode processes)
    before the interpreter's shutdown would stop them: without the pool's exit finalizer that join
    waited forever (a Dask nanny killed the worker after its timeout: cluster.close() took 4 s)."""
    paths, _ = films
    ctx = multiprocessing.get_context("spawn")  # like a Dask nanny's worker process
    q = ctx.Queue()
    child = ctx.Process(target=own_a_shared_pool, args=(paths[0], q))
    child.start()
    decode_pids = q.get(timeout=120)
    child.join(60)  # generous for a loaded machine; without the fix it never exits on its own
    hung = child.is_alive()
    if hung:
        child.kill()
        child.join()
    assert not hung, "the pool's owner hung at exit, joining its own decode processes"
    assert child.exitcode == 0 and 1 <= len(decode_pids) <= 2  # processes start on demand
    for pid in decode_pids:  # and the decode processes are gone with it
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{pid}")


def test_a_shard_task_arrives_on_a_worker_without_importing_torch(tmp_path):
    """A worker's first shard starts decoding before torch is loaded there: the task's function and
    its RunSpec unpickle without torch (the model loads once the films are submitted)."""
    import pickle
    import subprocess
    import sys
    from pathlib import Path

    from pipeline.inference.model import ModelSpec
    from pipeline.worker.runspec import RunSpec
    from pipeline.worker.score_shard import score_shard

    spec = RunSpec(out=str(tmp_path), model=ModelSpec("tiny"), model_version="m", baselines=(0.1,) * 14)
    (tmp_path / "task.pkl").write_bytes(pickle.dumps((score_shard, spec)))
    code = ("import pickle, sys; fn, spec = pickle.load(open(sys.argv[1], 'rb')); "
            "print(fn.__name__, type(spec.model).__name__, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "task.pkl")], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[2])
    assert out.stdout.split() == ["score_shard", "ModelSpec", "False"]
