"""The JSON records a run writes beside its outputs, declared like the Parquet schemas: ``run.json``
(RunRecord) and each shard's completion record (ShardRecord).

Each is serialised by its ``to_json`` and parsed by its ``from_json`` only; the annotations are the
schema (``from_json`` checks each value's JSON type against them). A field added later gets a
default, so files written before it still read.
"""

from __future__ import annotations

import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields

# run.json. A file without ``record_version`` was written before the version existed: the same
# field set, or (older runs) fewer fields, which read as their defaults.
RUN_RECORD_VERSION = 1
# Shard records of any other version are stale: their shard is scored again.
SHARD_RECORD_VERSION = 2


class RecordError(ValueError):
    """A record whose fields are not what its version declares (missing, or of another JSON type)."""


class StaleRecord(RecordError):
    """A shard record of another version: its shard is scored again."""


@dataclass
class RunRecord:
    """run.json: a run's settings, what it was computed from, its status, counts and timings, and
    each step's outcome. Rewritten as the run advances (``steps``), and by every no-op rerun
    (``reruns``)."""

    model_version: str
    status: str | None = None  # running | complete | incomplete | failed | partial | interrupted
    precision: str | None = None
    identity: dict = field(default_factory=dict)  # RunSpec.output_identity(): a rerun into the run dir must match it
    config: dict = field(default_factory=dict)  # ScoreConfig.flat(), storage options as keys only
    resolved: dict | None = None  # what baselines, cache and device came to
    model: dict | None = None  # ModelSpec.describe()
    dataset_fingerprint: str | None = None
    code_version: str | None = None
    torch_version: str | None = None
    started: str | None = None
    finished: str | None = None
    counts: dict | None = None  # None until the shards are gathered
    seconds: dict = field(default_factory=dict)
    failed_shards: list = field(default_factory=list)
    history: list = field(default_factory=list)  # earlier invocations into this run dir
    steps: dict = field(default_factory=dict)  # step -> done | failed | pending | skipped | interrupted | ...
    inputs: dict = field(default_factory=dict)  # what a rerun compares to know nothing changed (pipeline.run.uptodate)
    # written only when set:
    reruns: list = field(default_factory=list)  # no-op reruns, newest last
    replaced_latest: str | None = None  # the latest run this one replaced, while its drift is still to do
    report_inputs: str | None = None  # the aggregates' digest the report was drawn from
    error: str | None = None  # why a run stopped (a full disk)
    record_version: int = RUN_RECORD_VERSION
    extra: dict = field(default_factory=dict)  # keys this version does not know: kept as they were

    _WHEN_SET = ("reruns", "replaced_latest", "report_inputs", "error")

    def to_json(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "extra" and not (k in self._WHEN_SET and not v)}
        return {**self.extra, **out}

    @classmethod
    def from_json(cls, value) -> "RunRecord":
        version = value.get("record_version", RUN_RECORD_VERSION) if isinstance(value, dict) else None
        if isinstance(version, int) and version > RUN_RECORD_VERSION:
            raise RecordError(f"run.json has record_version {version}, newer than this cxr-audit reads ({RUN_RECORD_VERSION}): "
                              "read it with the version that wrote it")
        known, extra = _parse(cls, value)
        return cls(**known, extra=extra)


@dataclass(frozen=True)
class ShardRecord:
    """A shard's completion record: written after its Parquet part and Zarr region (so a record
    exists only for complete outputs), and what ``pipeline.store.shard_check`` checks them against."""

    status: str  # complete | partial (read errors a rerun retries)
    shard: int
    start: int
    stop: int
    digest: str  # of the shard's rows and films: a record of other rows is stale
    model_version: str
    n_images: int
    n_scored: int
    n_failed: int
    source_modes: dict  # source image mode -> films
    cache: dict | None  # hits, misses (and corrupted entries); None without a cache
    errors: list  # one row of errors.parquet per failed film
    seconds: dict  # decode_wait, forward, write, total
    device: str  # the device policy as the worker resolved it
    torch_threads: int
    outputs: dict  # fingerprints of the part and each Zarr chunk (shard_check.fingerprint_outputs)
    sources: dict = field(default_factory=dict)  # row -> the scored film's size and digest (--verify)
    decode_workers: int | None = None
    decode_pool_restarts: int = 0
    decode_processes_replaced: int = 0  # stopped or hung during this shard: killed, films redone
    precision: str | None = None
    record_version: int = SHARD_RECORD_VERSION

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, value) -> "ShardRecord":
        version = value.get("record_version") if isinstance(value, dict) else None
        if isinstance(value, dict) and version != SHARD_RECORD_VERSION:
            raise StaleRecord(f"record version {version}, not {SHARD_RECORD_VERSION}")
        known, _ = _parse(cls, value)  # keys of earlier versions of this one (decode_threads) are left out
        return cls(**known)


def _parse(cls, value) -> tuple[dict, dict]:
    """(the fields of ``cls`` that ``value`` holds, checked against their annotations; the other keys)."""
    if not isinstance(value, dict):
        raise RecordError(f"a {cls.__name__} is a JSON object, not {type(value).__name__}")
    hints = typing.get_type_hints(cls)
    known = {}
    for f in fields(cls):
        if f.name == "extra":
            continue
        if f.name not in value:
            if f.default is MISSING and f.default_factory is MISSING:
                raise RecordError(f"{cls.__name__} without {f.name!r}")
            continue
        kinds = _json_types(hints[f.name])
        v = value[f.name]
        if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds):
            raise RecordError(f"{cls.__name__} field {f.name!r} is {type(v).__name__}, not {' or '.join(k.__name__ for k in kinds)}")
        known[f.name] = v
    names = {f.name for f in fields(cls)}
    return known, {k: v for k, v in value.items() if k not in names}


def _json_types(hint) -> tuple[type, ...]:
    """int | None -> (int, NoneType); dict[str, int] -> (dict,); float also takes a JSON integer."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return tuple(t for a in typing.get_args(hint) for t in _json_types(a))
    base = typing.get_origin(hint) or hint
    return (int, float) if base is float else (base,)
