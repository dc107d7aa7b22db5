"""What every job's command line shares: --version, --quiet/--verbose, logging, error exits.

Program output (tables, summaries, paths) goes to stdout with print; diagnostics (what the job is
doing, notes, warnings) go through `logging` to stderr, so `--quiet` silences them and a pipe or
a cron log keeps only what was asked for. Every module logs under its own name (``pipeline.*``,
``jobs.*``): one tree, configured here.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys

import pipeline

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")  # CSI sequences (torch's messages carry bold codes)


def plain(text: str) -> str:
    """A message without terminal escape codes (whatever library it came from) and without the
    credentials a URL may carry."""
    from pipeline.core.redact import redact

    return redact(_ANSI.sub("", str(text)))


def add_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--config FILE.yaml: the configuration's sections from a file; flags given override it.

    The job's configuration flags default to argparse.SUPPRESS, so the namespace holds only the
    flags given on the command line (``overrides``) and every default stays in pipeline.config.run_config."""
    p.add_argument("--config", metavar="FILE.yaml",
                   help="settings from a YAML file, nested by section (data, model, images, compute, cluster, output, "
                        "aggregate; keys as the flags, e.g. compute: {shard_size: 512}); flags given here override it; "
                        "an unknown key is an error. See the README")
    return p


_OPTION_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_storage_option(text: str, flag: str = "--storage-option") -> tuple[str, object]:
    """``KEY=VALUE`` of --storage-option and --input-option: VALUE as JSON when it parses (``anon=true``
    -> True, ``client_kwargs={"region_name": "eu-west-1"}`` -> a dict), else the string itself. A
    malformed option is a ConfigError that never quotes the text (it may be a credential)."""
    from pipeline.core.errors import ConfigError

    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not _OPTION_KEY.match(key):
        raise ConfigError(f"{flag} takes KEY=VALUE, KEY a keyword argument of the filesystem "
                          "(e.g. endpoint_url=https://minio.example.org, anon=true); the text given is not shown")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


class _StorageOption(argparse.Action):
    """Collects repeated --storage-option / --input-option KEY=VALUE into one dict (later keys win)."""

    def __call__(self, parser, namespace, values, option_string=None):
        from pipeline.core.errors import ConfigError

        flag = self.option_strings[0]
        try:
            key, value = parse_storage_option(values, flag)
        except ConfigError as e:
            raise argparse.ArgumentError(self, str(e).removeprefix(f"{flag} ")) from None
        setattr(namespace, self.dest, {**(getattr(namespace, self.dest, None) or {}), key: value})


def _add_options_flag(p: argparse.ArgumentParser, flag: str, help: str) -> argparse.ArgumentParser:
    """A repeatable KEY=VALUE flag collected into one dict (default SUPPRESS: --config's stays)."""
    p.add_argument(flag, dest=flag[2:].replace("-", "_") + "s", action=_StorageOption, default=argparse.SUPPRESS,
                   metavar="KEY=VALUE", help=help)
    return p


def add_storage_options(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--storage-option KEY=VALUE (repeatable): fsspec options for --out, merged over
    output.storage_options of --config. Never saved or printed (the values may be credentials)."""
    return _add_options_flag(p, "--storage-option",
                             "repeatable: an fsspec option for --out only (inputs take --input-option), e.g. "
                             "endpoint_url=https://minio.example.org or anon=true (VALUE is read as JSON when it parses, else as "
                             "a string); merged over output.storage_options of --config. Never saved or printed; credentials are "
                             "better left to the environment (see the README)")


def add_input_options(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--input-option KEY=VALUE (repeatable): fsspec options for every input (dataset metadata, films,
    checkpoint, baselines file), merged over data.input_options of --config; a dataset with its own
    options in data.dataset_options uses those instead. Never saved or printed."""
    return _add_options_flag(p, "--input-option",
                             "repeatable: an fsspec option for every input (--dataset metadata and films, --metadata, --checkpoint, "
                             "--baselines file, bounding boxes), same form as --storage-option, which is for --out only; merged "
                             "over data.input_options of --config (data.dataset_options: NAME: {KEY: VALUE} gives one dataset "
                             "its own). Never saved or printed")


def comma_list(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def comma_list_or_file(text: str) -> tuple[str, ...]:
    """Names separated by commas, or a file of them (one per line or comma-separated)."""
    if os.path.exists(text):
        with open(text) as f:
            text = f.read().replace("\n", ",")
    return comma_list(text)


# Flags whose value is parsed here rather than by the type of their field.
_OWN_FLAGS = {"storage_options": add_storage_options, "input_options": add_input_options}


def add_flags(p: argparse.ArgumentParser, flags) -> argparse.ArgumentParser:
    """One argument per ``Flag`` (pipeline.config.run_config): its name, dest, type and choices from
    the field it sets; a bool is store_true, or --no-KEY where its default is true. Every flag
    defaults to SUPPRESS (the defaults stay in the configuration)."""
    from typing import Literal, get_args, get_origin

    from pipeline.config.run_config import flag_name, input_type

    for flag in flags:
        if flag.key in _OWN_FLAGS:
            _OWN_FLAGS[flag.key](p)
            continue
        hint, default = input_type(flag.key)
        name = flag_name(flag.key)
        kw: dict = {"dest": flag.key, "help": flag.help, "default": argparse.SUPPRESS}
        if flag.metavar:
            kw["metavar"] = flag.metavar
        if hint is bool:
            kw["action"] = "store_false" if default else "store_true"
            name = f"--no-{name[2:]}" if default else name
        elif get_origin(hint) is Literal:
            kw["choices"] = get_args(hint)
        elif hint in (int, float):
            kw["type"] = hint
        elif get_origin(hint) is tuple and flag.repeat:
            kw["action"] = "append"
        elif get_origin(hint) is tuple:
            kw["type"] = comma_list_or_file if flag.from_file else comma_list
        p.add_argument(name, **kw)
    return p


def overrides(args: argparse.Namespace) -> dict:
    """The configuration keys the command line set (flags defaulting to argparse.SUPPRESS)."""
    from pipeline.config.run_config import INPUT_KEYS

    return {k: v for k, v in vars(args).items() if k in INPUT_KEYS}


def job_config(args: argparse.Namespace, base=None):
    """The configuration: ``base`` (default: the defaults), then --config's file, then the flags given."""
    from pipeline.config.run_config import load_config

    return load_config(getattr(args, "config", None), overrides(args), base)


def out_from_args(args: argparse.Namespace):
    """The output folder (an OutputStore) from --out, else output.out of --config's file, opened
    with the file's output.storage_options and --storage-option over them: for the jobs that read
    a run's outputs."""
    from pipeline.core.errors import ConfigError

    output = job_config(args).output
    if not output.out:
        raise ConfigError("--out is required (or output.out in --config)")
    return output.store()


_QUOTED_KEY_VALUE = re.compile(r"(?P<q>['\"])(?P<key>-*[A-Za-z_][A-Za-z0-9_.-]*)=(?:(?!(?P=q)).)*(?P=q)")
_KEY_VALUE = re.compile(r"(?P<key>[A-Za-z_][A-Za-z0-9_.-]*)=(?P<value>[^\s'\",]+|'[^']*'|\"[^\"]*\")")


def safe_usage_error(message: str) -> str:
    """argparse's error message without the values it would echo: "unrecognized arguments" names
    only the flags (a mistyped --storage-option's value may be a credential); in every other message
    (an invalid value, an ambiguous ``--s=key=...``, an explicit argument ignored) the value of each
    KEY=VALUE is masked; URL credentials are masked everywhere."""
    from pipeline.core.redact import MASK

    prefix = "unrecognized arguments: "
    if message.startswith(prefix):
        words = message[len(prefix):].split()
        flags = [w.split("=", 1)[0] for w in words if w.startswith("-")]
        values = len(words) - len(flags) + sum("=" in w for w in words if w.startswith("-"))
        message = prefix + (" ".join(flags) or "(values only)") + (f" ({values} value(s) not shown)" if values else "")
    message = _QUOTED_KEY_VALUE.sub(lambda m: f"{m['q']}{m['key']}={MASK}{m['q']}", message)  # 'key=a value with spaces'
    return plain(_KEY_VALUE.sub(lambda m: f"{m['key']}={MASK}", message))


def add_common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    def error(message: str):
        p.print_usage(sys.stderr)
        p.exit(2, f"{p.prog}: error: {safe_usage_error(message)}\n")

    p.error = error  # argparse calls self.error: this parser's messages echo no values
    p.add_argument("--version", action="version", version=f"cxr-audit {pipeline.__version__}")
    g = p.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", action="store_true", help="print only results and errors")
    g.add_argument("-v", "--verbose", action="store_true", help="also print debugging detail (including Dask's own logs)")
    return p


class _Stderr(logging.Handler):
    """Writes to whatever sys.stderr is at the time (so pytest's capture and redirections work)."""

    def emit(self, record):
        try:
            sys.stderr.write(plain(self.format(record)) + "\n")
        except Exception:  # noqa: BLE001 - logging must never break the job
            self.handleError(record)


# The loggers whose INFO lines are the job's progress (the driver's steps: cluster, manifest, model,
# aggregates, report). Every other module's INFO is detail (per-shard lines of in-process workers,
# ...), printed with --verbose only; worker processes write theirs to OUT/logs/ (pipeline.worker.logs).
PROGRESS = ("jobs", "pipeline.run", "pipeline.analysis.aggregate")
TREES = ("pipeline", "jobs")  # the packages' loggers: every module logs as logging.getLogger(__name__)


def _is_progress(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in PROGRESS)


class _Shown(logging.Filter):
    """At the default level, INFO from the progress loggers only; warnings and errors from all."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record):
        least = self.level if self.level != logging.INFO or _is_progress(record.name) else logging.WARNING
        return record.levelno >= least


def setup_logging(args) -> None:
    """One stderr handler on the package loggers: progress lines (INFO of PROGRESS) and everyone's
    warnings; --quiet: warnings and errors only; --verbose: everything, with level and logger name."""
    level = logging.WARNING if getattr(args, "quiet", False) else logging.DEBUG if getattr(args, "verbose", False) else logging.INFO
    handler = _Stderr()
    handler.setFormatter(logging.Formatter("%(message)s" if level > logging.DEBUG else "%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_Shown(level))
    for name in TREES:
        logger = logging.getLogger(name)
        for h in [h for h in logger.handlers if isinstance(h, _Stderr)]:
            logger.removeHandler(h)
        logger.addHandler(handler)
        # INFO at least: a worker thread of an in-process cluster writes its INFO to OUT/logs/
        logger.setLevel(logging.DEBUG if level == logging.DEBUG else logging.INFO)
    for name in PROGRESS:  # --quiet: the driver asks isEnabledFor(INFO) before drawing a progress bar
        logging.getLogger(name).setLevel(level)


_FAST_EXIT: list[bool] = []


def skip_final_gc() -> None:
    """At the interpreter's exit, skip its last garbage collection over every object torch, pandas,
    pyarrow and matplotlib created (measured: 2.7 s -> 0.5 s of exit on the 2-core machine). atexit
    handlers still run; every output is already written and closed by then. Registered once."""
    if not _FAST_EXIT:
        import atexit
        import gc

        atexit.register(gc.freeze)  # atexit runs before the final collection; freeze moves all to a generation it skips
        _FAST_EXIT.append(True)


def fail(e: BaseException) -> int:
    """Print an actionable error (no traceback) and return the configuration-error exit status.
    A PermissionError is the storage refusing the credentials (or their absence): say where they go."""
    from pipeline.io.location import InputRefused

    text = plain(e)
    if isinstance(e, InputRefused):
        text = (f"permission denied: {text}. The storage of this input refused this account: give the inputs' credentials "
                "through the environment or fsspec's configuration (the workers need them too), or with --input-option "
                "KEY=VALUE (data.input_options, or data.dataset_options per dataset, in --config); --storage-option is for --out only")
    elif isinstance(e, PermissionError):
        text = (f"permission denied: {text}. The storage refused this account: give credentials through the "
                "environment or fsspec's configuration (the workers need them too), or with --storage-option KEY=VALUE "
                "for --out (--input-option KEY=VALUE for the inputs)")
    print(f"error: {text}", file=sys.stderr)
    return 2
