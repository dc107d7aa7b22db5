"""`cxr-audit COMMAND ...`: the jobs under one name, beside `python -m jobs.NAME`.

Each command's module is imported only when it is run, so `cxr-audit runs` never loads torch.
"""

from __future__ import annotations

import importlib
import sys

import pipeline

COMMANDS = {  # command -> (module, one line)
    "score": ("jobs.score_dataset", "score a dataset: predictions, maps, aggregates (python -m jobs.score_dataset)"),
    "aggregate": ("jobs.aggregate", "recompute a run's region statistics / identifiability from its outputs"),
    "runs": ("jobs.runs", "list the runs under --out; --latest prints the newest complete run's folder"),
    "drift": ("jobs.drift", "compare two runs"),
    "report": ("jobs.report", "write the HTML report of a run"),
    "convert-checkpoint": ("jobs.convert_checkpoint", "convert a trusted pickled checkpoint to safetensors"),
    "benchmark": ("jobs.benchmark", "throughput benchmark (see README)"),
    "benchmark-aggregates": ("jobs.benchmark_aggregates", "aggregation / identifiability benchmark on a synthetic run (see README)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: cxr-audit COMMAND [ARGS...]   (cxr-audit COMMAND --help for its flags)", "", "commands:"]
    lines += [f"  {name:{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"cxr-audit {pipeline.__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    sys.argv[0] = f"cxr-audit {argv[0]}"
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
