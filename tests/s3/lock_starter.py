"""A lock starter for tests/s3/test_s3_outputs.py, run as a process of its own (the lock judges
holders by pid): reads commands on stdin, one per line, and answers one line each.

    go T         at wall-clock time T, try to take the lock; answers "held" or "refused <why>"
    release      release it if held; answers "released"
"""

import json
import sys
import time

from pipeline.run.run_lock import LockError, acquire, release
from pipeline.store.layout import OutputStore


def main() -> None:
    store = OutputStore(sys.argv[1], json.loads(sys.stdin.readline()))  # options on stdin: never in argv
    me = None
    for line in sys.stdin:
        cmd, *arg = line.split()
        if cmd == "go":
            time.sleep(max(0.0, float(arg[0]) - time.time()))
            try:
                me, _ = acquire(store)
                answer = "held"
            except LockError as e:
                answer = "refused " + " ".join(str(e).split())
        else:
            if me is not None:
                release(store, me)
                me = None
            answer = "released"
        print(answer, flush=True)


if __name__ == "__main__":
    main()
