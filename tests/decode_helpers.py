"""What the decode-pool tests send to other processes: a decode process (or a spawned child) imports
this module to unpickle it, so it imports nothing heavy (not tests.conftest, which imports torch:
two seconds for every decode process a test restarts)."""

import os
import signal
import time
from dataclasses import dataclass

from pipeline.worker.decode_pool import DecodePool, DecodeTask, FilmJob


@dataclass(frozen=True)
class SlowTask(DecodeTask):
    """Decodes like the job, slowly enough that a test can kill a process with films in flight."""

    delay: float = 0.05
    poison: str = ""  # a film whose decoding kills its process

    def __call__(self, job):
        if self.poison and job.path == self.poison:
            os._exit(3)
        time.sleep(self.delay)
        return super().__call__(job)


def decode_in_daemon(path, q):
    pool = DecodePool(1)
    try:
        with pool.stream(DecodeTask(), [FilmJob(0, path)], window=1) as s:
            q.put([r[0].pixels.shape for _, r in s])
    finally:
        pool.close()


def start_pool_then_report(path, q):
    pool = DecodePool(2)
    with pool.stream(DecodeTask(), [FilmJob(0, path)], window=1) as s:
        list(s)
    q.put(pool.pids())
    time.sleep(600)  # killed by the test


def own_a_shared_pool(path: str, q) -> None:
    from pipeline.worker.decode_pool import shared_pool

    pool = shared_pool(2)
    pool.start()
    with pool.stream(DecodeTask(), [FilmJob(0, path)], window=2) as s:
        assert [job.pos for job, _ in s] == [0]
    q.put(pool.pids())
    # returns with the pool open, as a Dask worker process does when its nanny closes it


@dataclass(frozen=True)
class HangingTask(DecodeTask):
    """Decodes like the job, except one film that hangs its decode process (a decoder in an endless loop)."""

    hang: str = ""

    def __call__(self, job):
        if job.path == self.hang:
            time.sleep(3600)
        return super().__call__(job)


@dataclass(frozen=True)
class StopsOnce(DecodeTask):
    """Decodes like the job, except that the decode process that takes film ``stop`` first writes its pid
    to ``marker`` and stops itself (SIGSTOP) with that film in hand: the stream cannot finish before the
    pool's watchdog replaces the stopped process (the film then goes again, in a fresh process that
    finds the marker and decodes it). A test that sends SIGSTOP itself may catch a process between two
    films, and the other process then decodes them all before the watchdog looks."""

    stop: str = ""
    marker: str = ""

    def __call__(self, job):
        if job.path == self.stop:
            try:
                fd = os.open(self.marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                pass
            else:
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                os.kill(os.getpid(), signal.SIGSTOP)
        return super().__call__(job)
