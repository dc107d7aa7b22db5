"""Where a process tree wrote: run it under ``strace -ff`` (file syscalls only, filtered in the kernel
with seccomp-bpf) and list every path it created, opened for writing, renamed, linked or removed."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

WRITE_CALLS = ("open", "openat", "creat", "mkdir", "mkdirat", "rename", "renameat", "renameat2", "link", "linkat",
               "symlink", "symlinkat", "unlink", "unlinkat", "rmdir", "truncate")
# Not disk: the null device, POSIX shared memory (multiprocessing's semaphores), kernel files.
NOT_DISK = ("/dev/null", "/dev/shm/", "/proc/", "/sys/", "/dev/pts/", "/dev/tty")
_CALL = re.compile(r"^(\w+)\((.*)\)\s+=\s+(-?\d+)")
_ARG = re.compile(r'(?:(?:AT_FDCWD|\d+)<([^>]*)>,\s*)?"((?:[^"\\]|\\.)*)"')


def strace_prefix(log_dir: Path) -> list[str]:
    """The command prefix that records the tree's file syscalls as log_dir/trace.<pid>."""
    log_dir.mkdir(parents=True, exist_ok=True)
    return [shutil.which("strace") or "strace", "-ff", "-qq", "--seccomp-bpf", "-y", "-s", "4096",
            "-e", f"trace={','.join(WRITE_CALLS)}", "-o", str(log_dir / "trace")]


def _writes_in(line: str) -> list[str]:
    m = _CALL.match(line)
    if not m or int(m.group(3)) < 0:
        return []
    call, args = m.group(1), m.group(2)
    if call in ("open", "openat") and not re.search(r"O_WRONLY|O_RDWR|O_CREAT|O_TRUNC", args):
        return []
    paths = []
    for base, path in _ARG.findall(args):
        path = path.encode().decode("unicode_escape")
        paths.append(os.path.normpath(path if path.startswith("/") or not base else os.path.join(base, path)))
    return paths


def written_paths(log_dir: Path) -> set[str]:
    """Every path the traced processes wrote (successful calls only), disk paths only."""
    found = set()
    for trace in log_dir.glob("trace.*"):
        for line in trace.read_text(errors="replace").splitlines():
            found.update(p for p in _writes_in(line) if not p.startswith(NOT_DISK) and p != "/dev/null")
    return found


def outside(paths: set[str], allowed: list[Path]) -> list[str]:
    roots = [os.path.realpath(a) for a in allowed]
    return sorted(p for p in paths if not any(os.path.realpath(p) == r or os.path.realpath(p).startswith(r + os.sep) for r in roots))
