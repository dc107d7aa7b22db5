"""Decode films in worker processes, so that the process driving the model does no decoding.

Why processes: PNG decoding holds the GIL for much of its time, and every one of DenseNet's kernel
launches needs the GIL too; decode threads in the driving process starve it (measured on an H100:
16 decode threads 549 img/s, 16 processes 799). One pool per process (one Dask worker) is started
once and kept alive across shards; two shard tasks of a worker share it, the older one first, so the
next shard's films decode while the current shard finishes and writes (``DecodeStream``).

Failure modes: a decode process that dies (OOM killer, a crashing codec) breaks the pool
(``BrokenProcessPool``); the pool is restarted and every film that was in flight is resubmitted, one
at a time, so no film is lost or scored twice. Only a film that fails on its own is a bad film: it
crashed its process (a signal of its own: SIGSEGV, SIGABRT, ...; or an exit status) or hung it
(``DecodeTimeout``) twice while decoding alone, each time in a fresh process: a permanent failure of
stage ``decode``. A film whose process was killed from outside (SIGKILL of the OOM killer or a user,
SIGTERM) is not at fault: it goes again, and after KILLS_TO_GIVE_UP such kills it is recorded as
``DecodeWorkerKilled``, which a rerun retries. A film that fails to read or decode is a ``Failure``.

Deadlines: a decode process stopped (SIGSTOP, state T) for STOPPED_GRACE_S (a watchdog thread of
the pool looks every half second, films in flight or not: a stopped process would also hang the
executor's shutdown), or no result at all for ``deadline_s`` while films are in flight (a hung
decode), is killed and replaced; its films go again, and the worker's log says so. The clocks only
run in small steps of their own threads (a job suspended with Ctrl-Z and resumed kills nothing).

Per-film cost in the process that drives the model (issue 8): films go to the decode processes in
chunks of a few (one task, one pipe message, one future and one hand-over per chunk, not per film),
and decoded pixels come back through a shared memory block of the executor (an anonymous memory
file, one slot per film in flight), so only small messages cross the result pipe. That also keeps CPython's executor safe from
a decode process killed while writing a large result to the shared result pipe, which could leave
its manager thread waiting forever for the rest of a message.
"""

from __future__ import annotations

import importlib
import logging
import mmap
import multiprocessing
import multiprocessing.util
import os
import queue
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from pipeline.inference.images import Decoded, PreprocessConfig
from pipeline.io.location import InputOptions
from pipeline.io.reads import ReadLimits

log = logging.getLogger(__name__)

SERIAL_CRASHES_TO_FAIL = 2  # a film that kills (or hangs) a decode process twice on its own is a bad film
KILLS_TO_GIVE_UP = 4  # kills from outside while a film decodes alone before it is left to a rerun (retryable)
DEADLINE_S = 300.0  # no result from any decode process for this long while films are in flight: hung
STOPPED_GRACE_S = 5.0  # a decode process stopped (SIGSTOP) this long is replaced
# the signals a process gets from its own fault (a crashing codec); SIGKILL/SIGTERM come from outside
_OWN_SIGNALS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGFPE, signal.SIGILL, signal.SIGSYS}
PRELOAD = ["pipeline.worker.decode_pool", "pipeline.worker.cache"]  # what the decode processes' forkserver imports once
SLOT_BYTES = 224 * 224 * 3  # one slot holds a default-size RGB film; larger results travel pickled, as before
SLOTS = 256  # films in flight per executor: a shard's window plus the next shard's look-ahead, with room


@dataclass(frozen=True)
class Failure:
    """One film's failure: only the fields errors.parquet keeps cross the process boundary."""

    stage: str
    error_class: str
    message: str


@dataclass(frozen=True)
class FilmJob:
    pos: int  # position of the film in its shard
    path: str
    cached_key: str | None = None  # the cache's source key for this row (a match is a hit); None: no cache


@dataclass(frozen=True)
class DecodeTask:
    """What a decode process needs besides the film (picklable, sent with each job)."""

    preprocess: PreprocessConfig = PreprocessConfig()
    inputs: InputOptions = InputOptions()  # the options each film is read with
    use_cache: bool = False
    limits: ReadLimits = ReadLimits()
    # a grayscale film comes back as one (size, size) plane (Decoded.rgb() repeats it): a third of
    # the bytes to pickle, pipe and unpickle, and a cheaper normalize_batch in the driving process
    gray_plane: bool = False

    def __call__(self, job: FilmJob) -> tuple[Decoded | Failure | None, str | None]:
        """(Decoded | Failure | None for a cache hit, content key or None): the bytes are read once
        (bounded, retried); a hit needs no decoding and sends no pixels back."""
        from pipeline.worker.cache import content_key
        from pipeline.core.errors import ImageError
        from pipeline.inference.images import decode_bytes
        from pipeline.io.reads import read_bytes

        key = None
        try:
            data = read_bytes(job.path, self.inputs.options_for(job.path), self.limits)
            key = content_key(job.path, data)  # also the shard record's fingerprint of the film (--verify)
            if self.use_cache and job.cached_key is not None and key == job.cached_key:
                return None, key
            return decode_bytes(data, self.preprocess, self.limits, self.gray_plane), key
        except ImageError as e:
            return Failure(e.stage, e.error_class, str(e.cause)[:500]), key
        except Exception as e:  # noqa: BLE001 - never let one film break the pool
            return Failure("decode", type(e).__name__, str(e)[:500]), key


class DecodeWorkerDied(RuntimeError):
    """A decode process died of its own fault while decoding this film, alone, more than once."""


class DecodeTimeout(RuntimeError):
    """A decode process hung (no result within the deadline) while decoding this film, alone, twice."""


class DecodeWorkerKilled(RuntimeError):
    """Decode processes were killed from outside while decoding this film: not its fault, retryable."""


def _cause_of(codes: list[int | None]) -> str:
    """How an executor's processes ended: 'crashed' when one died of its own fault, else 'killed'."""
    for c in codes:
        if c is not None and (c > 0 or (c < 0 and -c in _OWN_SIGNALS)):
            return "crashed"
    return "killed"


def process_state(pid: int) -> str | None:
    """The state letter of /proc/<pid>/stat (R, S, D, T: stopped, t: traced...), None if unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError):
        return None


@dataclass(frozen=True)
class _InSlot:
    """A decoded film whose pixels wait in slot ``slot`` of the executor's shared block."""

    slot: int
    shape: tuple[int, ...]
    source_mode: str


_CHILD_SLOTS: dict[str, np.ndarray] = {}  # in a decode process: its executor's block, by name


def _attach_slots(name: str, nbytes: int) -> None:
    """Map the owner's block: ``name`` is /proc/<owner pid>/fd/<fd> of its anonymous memory file."""
    fd = os.open(name, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    try:
        buf = mmap.mmap(fd, nbytes)
    finally:
        os.close(fd)
    _CHILD_SLOTS[name] = np.frombuffer(buf, np.uint8).reshape(-1, SLOT_BYTES)


def _init_decode_process(owner_pid: int, slots_name: str | None = None, slots_bytes: int = 0) -> None:
    # Ctrl-C is the driver's to handle. Decoding uses PIL, not torch: torch is not imported here
    # (about 1.2 s of CPU per process); should something have imported it, one thread.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)
    threading.Thread(target=_exit_with_owner, args=(owner_pid,), name="owner-watch", daemon=True).start()
    if slots_name is not None:
        try:
            _attach_slots(slots_name, slots_bytes)
        except (ImportError, OSError):
            pass  # results travel pickled


def _run_chunk(fn: Callable, jobs: tuple, slots: tuple, slots_name: str | None) -> list:
    """In a decode process: fn(job) for each job of a chunk; a Decoded result's pixels go into its
    slot of the shared block (when the job has one and they fit), and only an _InSlot travels back."""
    block = _CHILD_SLOTS.get(slots_name) if slots_name is not None else None
    out = []
    for job, slot in zip(jobs, slots):
        result, extra = fn(job)
        if block is not None and slot is not None and isinstance(result, Decoded) and result.pixels.dtype == np.uint8 \
                and result.pixels.nbytes <= SLOT_BYTES:
            block[slot, : result.pixels.nbytes] = result.pixels.reshape(-1)
            result = _InSlot(slot, result.pixels.shape, result.source_mode)
        out.append((result, extra))
    return out


class _SlotBlock:
    """In the owner: one executor generation's block of SLOTS film slots and its free list. The block
    is an anonymous memory file (memfd): it has no name to leak, its memory goes with the last process
    that maps it (a crash or a SIGKILL to the whole job leaves nothing behind in /dev/shm), and decode
    processes open it through /proc/<owner pid>/fd. A broken executor's block is retired whole (a
    surviving process of it may still write into it)."""

    def __init__(self, n: int = SLOTS):
        size = n * SLOT_BYTES
        self.fd = os.memfd_create("cxr-audit-decode-slots", getattr(os, "MFD_CLOEXEC", 0))
        try:
            # reserve the pages now: a full memory is an error here (and pickled results), never a
            # SIGBUS in a decode process writing a slot
            os.posix_fallocate(self.fd, 0, size)
            self._mmap = mmap.mmap(self.fd, size)
        except OSError:
            os.close(self.fd)
            raise
        self.name = f"/proc/{os.getpid()}/fd/{self.fd}"
        self.view = np.frombuffer(self._mmap, np.uint8).reshape(n, SLOT_BYTES)
        self._free = deque(range(n))
        self._lock = threading.Lock()

    def take(self) -> int | None:
        with self._lock:
            return self._free.popleft() if self._free else None

    def give(self, slots: Iterable[int | None]) -> None:
        with self._lock:
            self._free.extend(s for s in slots if s is not None)

    def pixels(self, r: _InSlot) -> np.ndarray:
        n = int(np.prod(r.shape))
        return self.view[r.slot, :n].reshape(r.shape).copy()  # the slot is free again once copied

    def retire(self) -> None:
        """No new process attaches to it (its descriptor number may be reused)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        self.retire()
        self.view = None
        try:
            self._mmap.close()
        except BufferError:
            pass  # a view still held somewhere: the mapping goes with the process


def _new_block() -> _SlotBlock | None:
    if not hasattr(os, "memfd_create") or not os.path.isdir(f"/proc/{os.getpid()}/fd"):
        return None  # not Linux: results travel pickled
    try:
        return _SlotBlock()
    except (OSError, ValueError):
        return None  # memory is short: results travel pickled


def shm_problem() -> str | None:
    """Why this machine's /dev/shm cannot hold the semaphores that process pools need (full, read-only,
    absent), or None when it can. Costs one semaphore."""
    try:
        multiprocessing.get_context("forkserver").Lock()
    except OSError as e:
        return f"/dev/shm is full, read-only or missing ({type(e).__name__}: {e.strerror or e})"
    return None


def _ready(_job: Any) -> None:
    """A no-op task: submitting one per process makes the executor start them all."""


def _exit_with_owner(owner_pid: int) -> None:
    """Exit when the process that owns the pool dies (killed worker, SIGKILL to the job): a decode
    process holds its own task pipe open, so it would never see an end of input, and it keeps the
    forkserver alive."""
    try:
        fd = os.pidfd_open(owner_pid)  # readable once the owner has exited (Linux >= 5.3)
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        import select

        select.select([fd], [], [])
        os._exit(0)
    while True:
        time.sleep(1.0)
        try:
            os.kill(owner_pid, 0)
        except ProcessLookupError:
            os._exit(0)
        except PermissionError:
            pass


def _allow_children() -> None:
    """Dask's nanny starts worker processes as daemons, and multiprocessing refuses to let a daemon
    start children. The flag only matters to the process itself (its parent's Process object, which
    terminates it, is separate); our decode processes exit on their own when this process dies (their
    task pipe closes), so clearing it is safe."""
    me = multiprocessing.current_process()
    if me.daemon:
        me._config["daemon"] = False  # noqa: SLF001 - no public way to un-daemonise the current process


class PoolDisabled(RuntimeError):
    """The pool decodes in the calling process from now on (its processes could not start)."""


class DecodePool:
    """A pool of decode processes (``workers`` = 0: decode in the calling thread's process)."""

    def __init__(self, workers: int):
        self.workers = max(0, int(workers))
        self.restarts = 0
        self._lock = threading.Lock()
        self._executor: ProcessPoolExecutor | None = None
        self._block: _SlotBlock | None = None  # the current executor's shared pixel slots
        self._retired: list[_SlotBlock] = []  # blocks of broken executors, closed with the pool
        self._generation = 0
        self._causes: dict[int, str] = {}  # generation -> how it broke: crashed, killed, stopped or hung
        self._replacing: dict[int, str] = {}  # generation -> why we killed its processes ourselves
        self.replaced = 0  # decode processes killed and replaced because they were stopped or hung
        self._old_procs: list = []  # processes of broken executors (a stopped one would hang their shutdown)
        self._watchdog: threading.Thread | None = None
        self._closing = threading.Event()
        self._started = False
        self._streams: list[DecodeStream] = []  # registration order: the first one still submitting is the primary

    def _current(self) -> tuple[ProcessPoolExecutor, int]:
        with self._lock:
            if self.workers == 0:  # another thread found /dev/shm unusable after this one's check
                raise PoolDisabled("decode processes are off for this pool")
            if self._executor is None:
                _allow_children()
                ctx = multiprocessing.get_context("forkserver")
                # decode processes fork from a server that has already imported PIL, numpy, fsspec
                # and zarr (the cache's content keys), but not torch: see pipeline.inference.images
                ctx.set_forkserver_preload(PRELOAD)
                self._block = _new_block()
                slots = (self._block.name, self._block.view.nbytes) if self._block is not None else (None, 0)
                self._executor = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_decode_process,
                                                     initargs=(os.getpid(), *slots))
                if self._watchdog is None:
                    self._watchdog = threading.Thread(target=self._watch_stopped, name="decode-watchdog", daemon=True)
                    self._watchdog.start()
            return self._executor, self._generation

    def usable(self) -> bool:
        """Start the executor if need be; False (and ``workers`` 0 from then on: films decode in this
        process, as with --decode-workers 0) when /dev/shm cannot hold its semaphores, said once."""
        if self.workers == 0:
            return False
        try:
            self._current()
            return True
        except PoolDisabled:
            return False
        except OSError as e:
            why = shm_problem()
            if why is None:
                raise
            with self._lock:
                if self.workers:
                    log.warning(f"{why}: decode processes cannot start, so this worker decodes films in its own process "
                                f"(as --decode-workers 0; slower). Free space in /dev/shm (df -h /dev/shm) or mount it "
                                f"writable to decode in processes again. ({type(e).__name__}: {e})")
                self.workers = 0
            return False

    def _current_block(self, generation: int) -> _SlotBlock | None:
        with self._lock:
            return self._block if generation == self._generation else None

    def start(self) -> None:
        """Start the decode processes now (forkserver, preload, fork) rather than at the first film:
        the first shard task calls it in a thread so the start overlaps the model's load. On
        forkserver the executor spawns a process per submit only while none is idle, so a quick
        machine may start fewer than ``workers`` here; the rest start with the first films.
        (Launching them all with the executor's private ``_launch_processes`` made a decode process
        killed mid-result hang the executor in 3 of 24 runs of the kill test, against 0 of 44.)"""
        if self.workers == 0 or self._started:
            return
        self._started = True
        if not self.usable():
            return
        futures = [self.submit(_ready, None)[0] for _ in range(self.workers)]
        wait(futures)

    def start_in_background(self) -> threading.Thread:
        t = threading.Thread(target=self._start_quietly, name="decode-pool-start", daemon=True)
        t.start()
        return t

    def _start_quietly(self) -> None:
        try:
            self.start()
        except Exception:  # noqa: BLE001 - a pool that fails to start fails again, visibly, at the first film
            pass

    def submit(self, fn: Callable, *args: Any) -> tuple[Future, int]:
        while True:
            ex, gen = self._current()
            try:
                return ex.submit(fn, *args), gen
            except BrokenProcessPool:
                self.restart(gen)

    def submit_chunk(self, fn: Callable, jobs: list) -> tuple[Future, int, _SlotBlock | None, tuple]:
        """fn(job) for each of ``jobs`` in one decode process, one task: (future of the list of
        results, generation, the block whose slots the chunk holds, those slots)."""
        while True:
            ex, gen = self._current()
            block = self._current_block(gen)
            slots = tuple(block.take() for _ in jobs) if block is not None else (None,) * len(jobs)
            try:
                return ex.submit(_run_chunk, fn, tuple(jobs), slots, block.name if block is not None else None), gen, block, slots
            except BrokenProcessPool:
                if block is not None:
                    block.give(slots)
                self.restart(gen)

    def restart(self, generation: int) -> None:
        """Replace a broken executor (once, however many streams noticed), and note why it broke."""
        with self._lock:
            if generation != self._generation or self._executor is None:
                return
            ex = self._executor
            procs = list((getattr(ex, "_processes", None) or {}).values())
            manager = getattr(ex, "_executor_manager_thread", None)
            ex.shutdown(wait=False, cancel_futures=True)
            if manager is not None:  # it terminates and joins the rest: every exit status is known after
                manager.join(timeout=2.0)
            self._causes[generation] = self._replacing.pop(generation, None) or _cause_of([p.exitcode for p in procs])
            self._old_procs = [p for p in self._old_procs + procs if p.exitcode is None]
            self._executor = None
            if self._block is not None:  # a surviving process of the old executor may still write into it
                self._block.retire()
                self._retired.append(self._block)
                self._block = None
            self._generation += 1
            self.restarts += 1

    def cause(self, generation: int) -> str:
        """How that generation's executor broke: 'crashed' (a process died of its own fault), 'killed'
        (from outside), 'stopped' or 'hung' (we replaced it: ``replace``)."""
        with self._lock:
            return self._causes.get(generation, "killed")

    def replace(self, generation: int, pids: list[int], why: str) -> bool:
        """Kill these decode processes of that generation (stopped or hung): the executor breaks, and
        the streams resubmit their films. False when the generation is already gone."""
        with self._lock:
            if generation != self._generation or self._executor is None or generation in self._replacing:
                return False
            self._replacing[generation] = why
            self.replaced += len(pids)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)  # SIGKILL also ends a stopped process
            except ProcessLookupError:
                pass
        return True

    def _watch_stopped(self) -> None:
        """Kill any decode process (of this executor or a broken one) seen stopped for STOPPED_GRACE_S."""
        stopped: dict[int, float] = {}
        last = time.monotonic()
        while not self._closing.wait(0.5):
            now = time.monotonic()
            step, last = min(now - last, 1.0), now
            with self._lock:
                gen = self._generation
                current = list((getattr(self._executor, "_processes", None) or {}).keys()) if self._executor is not None else []
                old = [p.pid for p in self._old_procs if p.exitcode is None]
            seen = [pid for pid in current + old if process_state(pid) in ("T", "t")]
            stopped = {pid: stopped.get(pid, 0.0) + step for pid in seen}
            overdue = [pid for pid, t in stopped.items() if t >= STOPPED_GRACE_S]
            if not overdue:
                continue
            mine = [pid for pid in overdue if pid in current]
            if mine and self.replace(gen, mine, "stopped"):
                log.warning(f"decode process(es) {mine} stopped (SIGSTOP) for {STOPPED_GRACE_S:g} s: killed and replaced; "
                            "their films are decoded again")
            for pid in overdue:  # also those of a generation already broken or being replaced
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                stopped.pop(pid, None)

    def generation(self) -> int:
        with self._lock:
            return self._generation

    def pids(self) -> list[int]:
        ex = self._executor
        return sorted((getattr(ex, "_processes", None) or {}).keys()) if ex is not None else []

    def close(self) -> None:
        self._closing.set()
        for pid in self.pids() + [p.pid for p in self._old_procs if p.exitcode is None]:  # a stopped process would never read its stop sentinel: shutdown would wait forever
            if process_state(pid) in ("T", "t"):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        with self._lock:
            if self._executor is not None:
                self._executor.shutdown(wait=True, cancel_futures=True)
                self._executor = None
            for block in self._retired + ([self._block] if self._block is not None else []):
                block.close()
            self._retired, self._block = [], None

    def _is_primary(self, stream: "DecodeStream") -> bool:
        with self._lock:
            return bool(self._streams) and self._streams[0] is stream

    def _register(self, stream: "DecodeStream") -> None:
        with self._lock:
            self._streams.append(stream)

    def _unregister(self, stream: "DecodeStream") -> None:
        with self._lock:
            if stream in self._streams:
                self._streams.remove(stream)

    def stream(self, fn: Callable, jobs: Iterable[FilmJob], window: int, lookahead: int | None = None, chunk: int = 1,
               deadline_s: float | None = None) -> "DecodeStream":
        return DecodeStream(self, fn, list(jobs), window, lookahead if lookahead is not None else window, chunk,
                            DEADLINE_S if deadline_s is None else deadline_s)


_SHARED: dict[int, DecodePool] = {}
_SHARED_LOCK = threading.Lock()


def _close_shared() -> None:
    pool = _SHARED.pop(os.getpid(), None)
    if pool is not None:
        pool.close()


# A Dask worker is a multiprocessing child: at its exit, multiprocessing joins its non-daemon
# children (our decode processes) before the interpreter's own shutdown would tell them to stop,
# so the nanny waited out its kill timeout (measured: cluster.close() 4.0 s instead of 1.9 s).
# Finalizers with an exit priority run before that join; ours runs before the task queue's own
# (priority 10), which would stop the queue's feeder thread before our stop sentinels were sent.
multiprocessing.util.Finalize(None, _close_shared, exitpriority=100)


def shared_pool(workers: int) -> DecodePool:
    """This process's pool of ``workers`` decode processes, started once and reused by every shard."""
    with _SHARED_LOCK:
        pool = _SHARED.get(os.getpid())
        if pool is None or pool.workers != workers:
            if pool is not None:
                pool.close()
            pool = _SHARED[os.getpid()] = DecodePool(workers)
        return pool


def worker_cores() -> int:
    """Cores this process may run on (its CPU affinity: dask-cuda pins a GPU worker near its GPU)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def decode_process_count(decode_workers: int | None) -> int:
    """--decode-workers (its deprecated alias is resolved in the configuration), else one per core of this worker."""
    return worker_cores() if decode_workers is None else decode_workers


def warm_up(decode_workers: int | None, imports: tuple[str, ...] = (), model: tuple | None = None) -> None:
    """Run on every worker as soon as the cluster is up (``client.run``): in a thread, start this
    worker's decode processes, import the scoring code and load the run's model (``model``: a
    (ModelSpec, device policy) pair), so that none of it waits for the first shard (they overlap the
    driver's own preparation). Returns at once: client.run calls it on the worker's event loop."""
    threading.Thread(target=warm, args=(decode_workers, imports, model), name="cxr-warm-up", daemon=True).start()


def warm(decode_workers: int | None, imports: tuple[str, ...] = (), model: tuple | None = None) -> None:
    """warm_up's work, in the calling thread. Only a head start: whatever fails here, the first
    shard does again and says what is wrong (a checkpoint the driver refuses is never scored)."""
    pool = shared_pool(decode_process_count(decode_workers))
    pool.start_in_background()
    for name in imports:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the first shard imports it again and says what is wrong
            log.debug(f"warm-up: importing {name} failed", exc_info=True)
            return
    if model is not None:
        try:
            from pipeline.inference.model import get_model

            # loaded into this process's model cache, keyed as the shard tasks' RunSpec names it
            # (measured: DenseNet-121's build and torchvision's import, ~1.7 s of CPU, left the scoring phase)
            get_model(*model)
        except Exception:  # noqa: BLE001 - the first shard loads it again, and its failure is recorded there
            log.debug("warm-up: loading the run's model failed", exc_info=True)


_END = object()


class DecodeStream:
    """Yields (job, fn(job)) for every job exactly once, in completion order; fn returns a pair
    (result, extra), and a film that kills decode processes gets (Failure, None). A feeder thread keeps up
    to ``window`` films submitted or decoded-but-not-taken while this stream is the pool's oldest
    one still submitting, ``lookahead`` films otherwise; it submits them ``chunk`` films per task
    (films in flight when a decode process died go again one per task)."""

    def __init__(self, pool: DecodePool, fn: Callable, jobs: list[FilmJob], window: int, lookahead: int, chunk: int = 1,
                 deadline_s: float = DEADLINE_S):
        self.pool, self.fn = pool, fn
        self.deadline_s = max(0.1, float(deadline_s))
        self.window, self.lookahead = max(1, window), max(1, lookahead)
        self.chunk = max(1, int(chunk))
        self._todo: deque[FilmJob] = deque(jobs)
        self._out: queue.SimpleQueue = queue.SimpleQueue()
        self._cond = threading.Condition()
        self._untaken = 0
        self._closed = False
        pool._register(self)
        self._thread = threading.Thread(target=self._feed, name="decode-feeder", daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator[tuple[FilmJob, Any]]:
        while True:
            items = self._out.get()
            if items is _END:
                return
            if isinstance(items, BaseException):
                raise items
            with self._cond:  # once per chunk: the feeder may refill the window
                self._untaken -= len(items)
                self._cond.notify_all()
            yield from items

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        self.pool._unregister(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _emit(self, items: list[tuple[FilmJob, Any]]) -> None:
        if not items:
            return
        with self._cond:
            self._untaken += len(items)
        self._out.put(items)

    def _feed(self) -> None:
        try:
            if not self.pool.usable():  # no decode processes (--decode-workers 0, or /dev/shm unusable)
                for job in self._todo:
                    with self._cond:
                        while not self._closed and self._untaken >= self.window:
                            self._cond.wait(0.05)
                    if self._closed:
                        break
                    self._emit([(job, self.fn(job))])
                return
            self._feed_pool()
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._out.put(e)
        finally:
            self.pool._unregister(self)
            self._out.put(_END)

    def _feed_pool(self) -> None:
        _PoolFeed(self).run()

    def _limit(self) -> int:
        return self.window if self.pool._is_primary(self) else self.lookahead


class _PoolFeed:
    """A DecodeStream's feeding of the decode processes: the chunks it has in flight, and the films
    to submit again, one at a time, after a pool broke under them (a film that breaks fresh
    processes alone, or whose processes keep being killed from outside, fails instead)."""

    def __init__(self, stream: DecodeStream):
        self.stream, self.pool = stream, stream.pool
        # a future -> (its films, generation, the block holding their slots, the slots)
        self.inflight: dict[Future, tuple[list[FilmJob], int, _SlotBlock | None, tuple]] = {}
        self.n_inflight = 0  # films
        self.recovering: deque[FilmJob] = deque()  # in flight when the pool broke: resubmitted one at a time
        self.serial_crashes: dict[FilmJob, int] = {}  # films in flight when a pool broke -> own failures alone
        self.kills: dict[FilmJob, int] = {}  # -> kills from outside while alone
        self.watch = _Watch(self.pool, stream.deadline_s)
        # Finished futures arrive here (done callbacks): O(1) per chunk, where wait(FIRST_COMPLETED)
        # over a window of futures cost O(window) lock operations, in the GIL-bound process that
        # drives the model.
        self.finished: queue.SimpleQueue = queue.SimpleQueue()

    def run(self) -> None:
        while self.stream._todo or self.inflight or self.recovering:
            room = self._room()
            if room is None:
                return
            self._submit_more(room)
            if not self.inflight:
                self.watch.idle()
                continue
            done = self._finished()
            if done:
                broken = self._emit_done(done)
                if broken:
                    self._recover(broken)

    def _room(self) -> int | None:
        """Films the window has room for, once the consumer has taken enough; None when the stream
        was closed (the slots of films still in flight are freed once no process can write them)."""
        s = self.stream
        with s._cond:
            while not s._closed and (self.n_inflight + s._untaken) >= s._limit() and not self.inflight:
                s._cond.wait(0.05)  # the consumer is behind: wait for it to take results
            if s._closed:
                for f, (_, _, block, slots) in self.inflight.items():
                    if block is not None:
                        if f.cancel():
                            block.give(slots)
                        else:
                            f.add_done_callback(lambda _f, b=block, sl=slots: b.give(sl))
                return None
            return s._limit() - self.n_inflight - s._untaken

    def _submit_more(self, room: int) -> None:
        s = self.stream
        if self.recovering:
            if not self.inflight:
                self._submit([self.recovering.popleft()])
            return
        # whole chunks while the window has room for one (a partial one only at the end, or
        # when the window is smaller than a chunk and nothing is in flight)
        while s._todo and (room >= min(s.chunk, len(s._todo)) or (not self.inflight and room > 0)):
            k = min(s.chunk, len(s._todo), max(room, 1))
            self._submit([s._todo.popleft() for _ in range(k)])
            room -= k
        if not s._todo:
            self.pool._unregister(s)  # the next stream becomes the primary now

    def _submit(self, jobs: list[FilmJob]) -> None:
        fut, gen, block, slots = self.pool.submit_chunk(self.stream.fn, jobs)
        self.inflight[fut] = (jobs, gen, block, slots)
        self.n_inflight += len(jobs)
        fut.add_done_callback(self.finished.put)

    def _finished(self) -> list[Future]:
        """The futures finished since the last look (waiting up to 0.1 s for one; none: the deadlines
        are checked)."""
        try:
            done = [self.finished.get(timeout=0.1)]
        except queue.Empty:
            self.watch.check(self.inflight)
            return []
        self.watch.progress()
        while True:
            try:
                done.append(self.finished.get_nowait())
            except queue.Empty:
                return done

    def _emit_done(self, done: list[Future]) -> list[tuple[FilmJob, int]]:
        """Hand the finished chunks' films to the consumer. Returns the films (and generation) of
        those whose pool broke: with every other film then in flight, which went down with it."""
        broken: list[tuple[FilmJob, int]] = []
        for f in done:
            entry = self.inflight.pop(f, None)
            if entry is None:  # already taken below, when its pool broke
                continue
            self.n_inflight -= len(entry[0])
            broken += self._emit(f, entry)
        if broken and self.inflight:  # wait for the other futures to say so
            wait(self.inflight)
            for f, entry in list(self.inflight.items()):
                broken += self._emit(f, entry)
            self.inflight.clear()
            self.n_inflight = 0
        return broken

    def _emit(self, f: Future, entry) -> list[tuple[FilmJob, int]]:
        """A finished chunk's (job, (result, extra)) pairs to the consumer, pixels copied out of their
        slots (freed); its films and generation instead when its pool broke."""
        jobs, gen, block, slots = entry
        try:
            out = f.result()
        except BrokenProcessPool:
            return [(job, gen) for job in jobs]  # its block is retired whole: a surviving process may still write into it
        except BaseException:
            if block is not None:
                block.give(slots)
            raise
        if block is not None:
            try:
                out = [(Decoded(block.pixels(r), r.source_mode), x) if isinstance(r, _InSlot) else (r, x) for r, x in out]
            finally:
                block.give(slots)
        self.stream._emit(list(zip(jobs, out)))
        return []

    def _recover(self, broken: list[tuple[FilmJob, int]]) -> None:
        """Restart the broken generations; their films go again one at a time, or fail."""
        gens = {g for _, g in broken}
        for gen in gens:
            self.pool.restart(gen)
        causes = {self.pool.cause(g) for g in gens}
        self.watch.progress()
        was_serial = len(broken) == 1 and broken[0][0] in self.serial_crashes
        for job, _ in broken:
            failure = self._gave_up(job, was_serial, causes)
            if failure is not None:
                self.stream._emit([(job, (failure, None))])
            else:
                self.recovering.append(job)

    def _gave_up(self, job: FilmJob, was_serial: bool, causes: set) -> Failure | None:
        """The film's failure when it has broken fresh processes alone too often (its own fault), or
        its processes were killed from outside too often; else None (it goes again)."""
        if not was_serial:
            self.serial_crashes.setdefault(job, 0)
            return None
        if causes & {"crashed", "hung"}:  # its own fault, alone in a fresh process
            self.serial_crashes[job] += 1
            n = self.serial_crashes[job]
            if n < SERIAL_CRASHES_TO_FAIL:
                return None
            err = DecodeTimeout if "hung" in causes else DecodeWorkerDied
            what = (f"no result within {self.stream.deadline_s:g} s" if err is DecodeTimeout else "a decode process died of its own fault")
            return Failure("decode", err.__name__, f"{what} {n} times while decoding this film alone, each time in a fresh process: a bad film")
        self.kills[job] = self.kills.get(job, 0) + 1  # killed or stopped from outside: not the film's fault
        if self.kills[job] < KILLS_TO_GIVE_UP:
            return None
        return Failure("decode", DecodeWorkerKilled.__name__, f"decode processes were killed from outside {self.kills[job]} times while "
                       "decoding this film (OOM killer, a signal); the film is not at fault: a rerun retries it")


class _Watch:
    """A stream's deadlines. Time counts only in small steps of the feeder's own loop (at most
    0.5 s each), so a whole job suspended (Ctrl-Z) and resumed has not 'waited' meanwhile."""

    STEP_MAX = 0.5
    CHECK_EVERY = 0.5  # seconds between looks at the decode processes' states

    def __init__(self, pool: DecodePool, deadline_s: float):
        self.pool, self.deadline_s = pool, deadline_s
        self._last = time.monotonic()
        self._waited = 0.0  # with films in flight, since the last result
        self._since_check = 0.0

    def _step(self) -> float:
        now = time.monotonic()
        dt, self._last = min(now - self._last, self.STEP_MAX), now
        return dt

    def idle(self) -> None:
        self._step()
        self._waited = 0.0

    def progress(self) -> None:
        self._step()
        self._waited = 0.0

    def check(self, inflight: dict) -> None:
        dt = self._step()
        self._waited += dt
        self._since_check += dt
        if self._since_check < self.CHECK_EVERY:
            return
        self._since_check = 0.0
        gens = {entry[1] for entry in inflight.values()}
        gen = self.pool.generation()
        if gen not in gens:
            return  # its films are in a broken generation: the BrokenProcessPool is on its way
        if self._waited >= self.deadline_s:  # (a stopped process is the pool's watchdog's)
            pids = self.pool.pids()
            if self.pool.replace(gen, pids, "hung"):
                log.warning(f"no decoded film for {self.deadline_s:g} s with films in flight: the decode processes {pids} are "
                            "hung; killed and replaced, their films are decoded again (a film that hangs twice alone is "
                            "recorded as DecodeTimeout)")
            self._waited = 0.0
