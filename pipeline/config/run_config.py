"""The one configuration of a scoring run, and of the jobs that read its outputs.

``ScoreConfig`` is nested and frozen: one section per concern (``data``, ``model``, ``images``,
``compute``, ``cluster``, ``output``, ``aggregate``). Every default is written once: here, or in
the layer that owns the setting (``SourceOptions``, ``ReadLimits``, ``PreprocessConfig``,
``AggregateConfig``, the architecture registry, the precision modes), and the sections take it
from there. Choices are ``Literal`` types checked on construction, so a wrong value from a flag, a
YAML file or Python is the same ``ConfigError`` naming the flag and the choices.

Layers, later wins: the defaults, the demo (no dataset, checkpoint or output given anywhere), a
YAML file (``--config``, nested like ``to_dict()``; an unknown key is an error naming it), the
command line. ``resolve`` turns the choices that depend on the data (baselines, the cache) into
values once, before the shard spec is derived from the result. The device stays a policy: ``auto``
is resolved on each worker, where the GPU is, by ``pipeline.inference.model.resolve_device``.

The saved form (``flat()``, the ``config`` of run.json) keeps the keys run.json has always had;
``ScoreConfig.from_flat`` reads it back.

The scoring job's command line is generated: ``score_flags`` gives each key's help and metavar, and
``jobs._common.add_flags`` takes the flag's name, type, choices and store_true/--no- form from the
key's field. A layer (a YAML file, the flags given) replaces keys in the sections (``updated``).

A deprecated key (``ALIASES``: ``--decode-threads``, ``compute.decode_threads``) is accepted in every
layer and resolved here, once: it sets the key that replaced it, with a note printed once. It is no
field of any section, so nothing past the configuration (the shard spec, the workers) ever sees it.

No torch, numpy or pandas here: a configuration error must come back in well under a second.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args, get_origin

from pipeline.analysis.settings import AggregateConfig
from pipeline.core.errors import ConfigError
from pipeline.core.findings import CHEXNET_FINDINGS
from pipeline.core.redact import MaskedDict
from pipeline.inference.architectures import DEFAULT_ARCH, arch_profile, check_arch
from pipeline.inference.model_spec import ModelSpec, model_spec_for
from pipeline.inference.precision import DEFAULT_PRECISION, Precision
from pipeline.inference.preprocess_config import HighBitDepth, PreprocessConfig
from pipeline.io.location import InputOptions, Location
from pipeline.io.reads import ReadLimits
from pipeline.sources.source_base import DatasetSpec, SourceOptions, Uncertain
from pipeline.store.layout import OutputStore

DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
BASELINE_MODES = ("reference", "from-labels")  # or the URL of a JSON/CSV file
CACHE_MODES = ("auto", "none")  # or a URL
DEFAULT_CLUSTER_FILE = "cluster.yaml"  # used when present; else the built-in local profiles

_SRC = SourceOptions()
_READ = ReadLimits()
_PRE = PreprocessConfig()


@dataclass(frozen=True)
class DataConfig:
    """What to score: the datasets and how their metadata is read."""

    datasets: tuple[str, ...] = ()  # [NAME=]ADAPTER:LOCATION, adapters from pipeline.sources ADAPTERS
    metadata: str | None = _SRC.metadata
    views: tuple[str, ...] = _SRC.views  # 'frontal', 'all', or view codes
    site_column: str | None = _SRC.site_column
    uncertain: Uncertain = _SRC.uncertain
    allow_roots: tuple[str, ...] = _SRC.allow_roots
    limit: int | None = None  # score only the first N manifest rows
    # fsspec options for every input (metadata, films, checkpoint, baselines file); never saved: may hold secrets
    input_options: Mapping[str, Any] = field(default_factory=dict)
    # NAME -> fsspec options for the files of that --dataset instead of input_options (never saved)
    dataset_options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        # their reprs name the keys only (ScoreConfig's type check says the rest)
        if isinstance(self.input_options, Mapping):
            object.__setattr__(self, "input_options", MaskedDict(self.input_options))
        if isinstance(self.dataset_options, Mapping):
            object.__setattr__(self, "dataset_options", MaskedDict(
                {k: MaskedDict(v) if isinstance(v, Mapping) else v for k, v in self.dataset_options.items()}))

    def source_options(self) -> SourceOptions:
        return SourceOptions(metadata=self.metadata, views=self.views, site_column=self.site_column,
                             uncertain=self.uncertain, allow_roots=self.allow_roots)

    def inputs(self) -> InputOptions:
        """The options each input is opened with: a dataset's own (dataset_options) for the files
        under its folder, input_options for every other input."""
        specs = [DatasetSpec.parse(d) for d in self.datasets] if self.dataset_options else []
        roots = tuple(Location(s.folder, self.dataset_options[s.name]) for s in specs if s.name in self.dataset_options)
        return InputOptions(self.input_options, roots)


@dataclass(frozen=True)
class ModelConfig:
    """Which network, which weights, which outputs, and how exactly it computes."""

    checkpoint: str | None = None  # a path/URL, or 'random:SEED'
    arch: str = DEFAULT_ARCH  # a registered name or 'package.module:callable'
    findings: tuple[str, ...] = CHEXNET_FINDINGS
    baselines: str = BASELINE_MODES[0]  # 'reference', 'from-labels' or a file URL
    precision: Precision = DEFAULT_PRECISION


@dataclass(frozen=True)
class ImagesConfig:
    """How each film is read and preprocessed (bounds from ReadLimits, pixels from PreprocessConfig)."""

    high_bit_depth: HighBitDepth = _PRE.high_bit_depth
    max_image_bytes: int = _READ.max_bytes
    max_image_pixels: int = _READ.max_pixels
    max_aspect_ratio: float = _READ.max_aspect
    read_timeout: float = _READ.timeout_s
    read_retries: int = _READ.retries

    def read_limits(self) -> ReadLimits:
        return ReadLimits(max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels, max_aspect=self.max_aspect_ratio,
                          timeout_s=self.read_timeout, retries=self.read_retries)

    def preprocess(self) -> PreprocessConfig:
        return PreprocessConfig(high_bit_depth=self.high_bit_depth)


@dataclass(frozen=True)
class ComputeConfig:
    """How the work is cut and run on each worker."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N; 'auto' is resolved on each worker
    batch_size: int = 32
    shard_size: int = 1024  # images per shard and Zarr chunk length (part of the run's identity)
    decode_workers: int | None = None  # decode processes per worker (None: one per core; 0: in-process); alias decode_threads
    cache: str = CACHE_MODES[0]  # 'auto': OUT/cache; 'none'; or a URL


@dataclass(frozen=True)
class ClusterConfig:
    """Where the Dask workers come from (profiles in cluster.yaml)."""

    profile: str | None = None  # None: the profiles file's default ('local')
    file: str | None = None  # None: ./cluster.yaml if present, else the built-in local profiles
    worker_timeout: float | None = None  # None: the profile's (120 s local, 1800 s SLURM)

    @property
    def path(self) -> str:
        return self.file or DEFAULT_CLUSTER_FILE


@dataclass(frozen=True)
class OutputConfig:
    """Where results go, and when a run counts as done."""

    out: str | None = None  # output root (fsspec URL)
    storage_options: Mapping[str, Any] = field(default_factory=dict)  # fsspec options for --out only (never saved: may hold secrets)
    verify: bool = False  # on resume, rehash finished shards' outputs (default: sizes only)
    max_failed_fraction: float = 0.05  # more failed images: status failed/partial, exit 3
    report: bool = True  # the HTML report at the end of a complete run (False: none; build it later with jobs.report)

    def __post_init__(self):
        if isinstance(self.storage_options, Mapping):  # its repr names the keys only (ScoreConfig's type check says the rest)
            object.__setattr__(self, "storage_options", MaskedDict(self.storage_options))

    def store(self) -> OutputStore:
        """The output folder with the options that open it: every output path comes from it."""
        return OutputStore(self.out, self.storage_options)


# The sections, in the order of to_dict() and of a YAML file.
SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "images": ImagesConfig, "compute": ComputeConfig,
                             "cluster": ClusterConfig, "output": OutputConfig, "aggregate": AggregateConfig}
# Options that may hold credentials: never saved (run.json keeps their keys, config.yaml names them),
# never quoted, masked in reprs; none is part of a run's identity.
SECRET_OPTIONS = {("data", "input_options"), ("data", "dataset_options"), ("output", "storage_options")}
# The keys of the saved (flat) form that differ from the field name; all others are the field name.
_FLAT_NAMES = {("cluster", "profile"): "cluster", ("cluster", "file"): "cluster_file"}
# Deprecated keys, (section, old name) -> the field it sets (where the same layer does not set that
# field itself), and the smallest value the old key took. Their flat key is the old name.
ALIASES: dict[tuple[str, str], tuple[str, int]] = {("compute", "decode_threads"): ("decode_workers", 1)}
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoreConfig:
    """The whole configuration. Build it with ``ScoreConfig.of(out=..., shard_size=...)`` (flat
    keys), ``from_dict`` (nested, as in a YAML file) or ``from_flat`` (run.json's ``config``)."""

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    images: ImagesConfig = ImagesConfig()
    compute: ComputeConfig = ComputeConfig()
    cluster: ClusterConfig = ClusterConfig()
    output: OutputConfig = OutputConfig()
    aggregate: AggregateConfig = AggregateConfig()

    def __post_init__(self):
        for name, cls in SECTIONS.items():
            section = getattr(self, name)
            if not isinstance(section, cls):
                raise ConfigError(f"section {name!r} must be a {cls.__name__}, got {type(section).__name__}")
            for f in fields(section):
                _check_type(name, f.name, getattr(section, f.name), _hints(cls)[f.name])
        _check_values(self)

    # ---- the forms it is read from and saved as
    @classmethod
    def from_dict(cls, doc: Mapping, where: str = "the configuration") -> "ScoreConfig":
        """From the nested form (a YAML file's contents). Unknown sections or keys are errors naming them."""
        return cls().updated(doc, where)

    def updated(self, layer: Mapping, where: str = "the configuration") -> "ScoreConfig":
        """This configuration with one layer over it (nested, as in a YAML file): each key the layer
        gives replaces its value whole, the others stay. Unknown sections or keys are errors naming them."""
        if not isinstance(layer, Mapping):
            raise ConfigError(f"{where} must be a mapping of sections ({', '.join(SECTIONS)}), got {type(layer).__name__}")
        layer = resolve_aliases(layer)
        unknown = [k for k in layer if k not in SECTIONS]
        if unknown:
            raise ConfigError(f"{where}: unknown section {unknown[0]!r}; sections are {', '.join(SECTIONS)}")
        parts = {}
        for name, sec in SECTIONS.items():
            values = layer.get(name) or {}
            if not isinstance(values, Mapping):
                raise ConfigError(f"{where}: section {name!r} must be a mapping of keys, got {type(values).__name__}")
            known = {f.name for f in fields(sec)}
            bad = [k for k in values if k not in known]
            if bad:
                raise ConfigError(f"{where}: unknown key {name}.{bad[0]}{_did_you_mean(bad[0], known)}; "
                                  f"keys of {name!r}: {', '.join(sorted(known))}")
            hints = _hints(sec)
            parts[name] = dataclasses.replace(getattr(self, name), **{k: _coerce(name, k, v, hints[k]) for k, v in values.items()})
        return ScoreConfig(**parts)

    def to_dict(self) -> dict:
        """The nested form with plain values (lists, dicts): what a YAML file holds. The options
        (SECRET_OPTIONS: storage, input and dataset options) are left out (they may hold secrets; pass
        them with --storage-option / --input-option, in the file, in Python, or leave credentials to
        the environment)."""
        doc = {name: _plain(dataclasses.asdict(getattr(self, name))) for name in SECTIONS}
        for section, name in SECRET_OPTIONS:
            doc[section].pop(name)
        return doc

    @classmethod
    def from_flat(cls, flat: Mapping, where: str = "the configuration") -> "ScoreConfig":
        """From flat keys (run.json's ``config``; the dests of the job's flags)."""
        # run.json keeps only the keys of the storage and input options: they are not read back
        flat = {k: v for k, v in flat.items() if not (FLAT_KEYS.get(k) in SECRET_OPTIONS and not isinstance(v, Mapping))}
        return cls.from_dict(_nested(flat, where), where)

    @classmethod
    def of(cls, **flat) -> "ScoreConfig":
        return cls.from_flat(flat)

    def flat(self) -> dict:
        """The saved form: one key per setting, the keys run.json's ``config`` has always had
        (storage options as their sorted keys only: the values may be secrets)."""
        out = {}
        for key, (section, name) in FLAT_KEYS.items():
            value = getattr(getattr(self, section), name)
            out[key] = sorted(value) if (section, name) in SECRET_OPTIONS else _plain(value)
        return out

    def with_overrides(self, flat: Mapping, where: str = "the command line") -> "ScoreConfig":
        """A new configuration with these flat keys replaced (the flags given on the command line)."""
        return self.updated(_nested(flat, where), where)

    # ---- what the run needs, derived (never stored twice)
    def read_limits(self) -> ReadLimits:
        return self.images.read_limits()

    def source_options(self) -> SourceOptions:
        return self.data.source_options()

    def model_spec(self) -> ModelSpec:
        """The model the run scores with, as its shard tasks name it: the driver checks it and the
        local workers load it ahead of the first shard (``get_model``'s cache is keyed by it)."""
        return model_spec_for(self.model.arch, self.model.checkpoint, tuple(self.model.findings),
                              storage_options=self.inputs().options_of(self.model.checkpoint or ""))

    def inputs(self) -> InputOptions:
        return self.data.inputs()

    def findings(self) -> tuple[str, ...]:
        """The findings the run scores: --findings, less those the model has no output for (a
        torchxrayvision model scores only the findings it was trained on; model_spec_for)."""
        return model_spec_for(self.model.arch, self.model.checkpoint or "random:0", tuple(self.model.findings)).findings

    def preprocess(self) -> PreprocessConfig:
        """The pixels the model sees: --high-bit-depth, and the model's preprocessing and input size."""
        arch = arch_profile(self.model.arch)
        return PreprocessConfig(size=arch.input_size, high_bit_depth=self.images.high_bit_depth, method=arch.preprocess)


FLAT_KEYS: dict[str, tuple[str, str]] = {
    _FLAT_NAMES.get((section, f.name), f.name): (section, f.name) for section, cls in SECTIONS.items() for f in fields(cls)
}
assert len(FLAT_KEYS) == sum(len(fields(c)) for c in SECTIONS.values()), "flat keys must be unique across sections"
# What a layer may set: the saved keys and the deprecated ones (the job's flags set these dests).
INPUT_KEYS: dict[str, tuple[str, str]] = {**FLAT_KEYS, **{old: (section, old) for section, old in ALIASES}}


def _nested(flat: Mapping, where: str) -> dict[str, dict]:
    """Flat keys as one layer of the nested form, deprecated keys resolved."""
    doc: dict[str, dict] = {}
    for key, value in flat.items():
        if key not in INPUT_KEYS:
            raise ConfigError(f"{where}: unknown key {key!r}{_did_you_mean(key, FLAT_KEYS)}")
        section, name = INPUT_KEYS[key]
        doc.setdefault(section, {})[name] = value
    return resolve_aliases(doc)


_NOTED: set[tuple[str, str]] = set()  # the deprecated keys noted in this process


def resolve_aliases(layer: Mapping) -> dict:
    """One layer (nested, as in a YAML file) with each deprecated key replaced by the field it sets,
    unless the layer sets that field itself; the first use in a process logs a note."""
    doc = dict(layer)
    for (section, old), (new, least) in ALIASES.items():
        values = doc.get(section)
        if not isinstance(values, Mapping) or old not in values:
            continue  # (from_dict says what is wrong with a section that is no mapping)
        values = dict(values)
        value = values.pop(old)
        _check_type(section, old, value, _hints(SECTIONS[section])[new])
        if value is not None:
            if value < least:
                raise ConfigError(f"{FLAGS[old]} must be at least {least}")
            if values.get(new) is None:
                values[new] = value
            if (section, old) not in _NOTED:
                _NOTED.add((section, old))
                log.warning(f"{flag_of(section, old)} is deprecated: it sets {flag_of(section, new)}; use that instead")
        doc[section] = values
    return doc

# The flag that sets each key (for messages); keys without a flag are named by their path.
FLAGS = {
    "datasets": "--dataset", "allow_roots": "--allow-root", "cluster": "--cluster", "cluster_file": "--cluster-file",
    "targets": "--confounder", "decode_threads": "--decode-threads", "n_boot": None, "storage_options": "--storage-option",
    "input_options": "--input-option", "dataset_options": None,
}
_COMMA_LISTS = {("data", "views"), ("model", "findings")}  # a string is split on commas, as the flag's value is


def flag_of(section: str, name: str) -> str:
    flag = flag_name(_FLAT_NAMES.get((section, name), name))
    return f"{flag} ({section}.{name})" if flag else f"{section}.{name}"


def flag_name(key: str) -> str | None:
    """The flag of an input key (INPUT_KEYS), as messages and the parser name it; None: file only."""
    return FLAGS.get(key, "--" + key.replace("_", "-"))


def input_type(key: str) -> tuple[Any, Any]:
    """(type, default) of the field an input key sets (INPUT_KEYS; a deprecated key, the field it
    sets), with ``X | None`` as X."""
    section, name = INPUT_KEYS[key]
    name = ALIASES.get((section, name), (name,))[0]
    default = next(f.default for f in fields(SECTIONS[section]) if f.name == name)
    return _optional(_hints(SECTIONS[section])[name])[0], default


@dataclass(frozen=True)
class Flag:
    """One flag of the scoring job: the key it sets and the words of its help. Everything else (its
    name, dest, type, choices, store_true/--no- form) comes from the key's field (jobs._common.add_flags)."""

    key: str  # a key of INPUT_KEYS
    metavar: str | None = None
    help: str = ""
    repeat: bool = False  # a list given one item per use (--dataset A --dataset B); else a list is A,B,...
    from_file: bool = False  # a list may also be a file of items (one per line or comma-separated)


def score_flags() -> tuple[Flag, ...]:
    """The scoring job's configuration flags in the order of its --help, defaults quoted from here."""
    from pipeline.inference.architectures import ARCHITECTURES
    from pipeline.sources.source_base import ADAPTERS

    D = ScoreConfig()
    return (
        Flag("datasets", "[NAME=]ADAPTER:LOCATION",
             f"repeatable. Adapters: {', '.join(f'{n} ({ADAPTERS.help(n)})' for n in ADAPTERS)}. "
             "Locations are fsspec URLs (local path, file://, s3://, memory://).", repeat=True),
        Flag("views", "frontal|all|AP,PA,...",
             f"which views to score: 'frontal' (default {','.join(D.data.views)}: lateral views are left out and counted), "
             "'all', or a list of codes"),
        Flag("site_column", "COLUMN", "take 'site' from this manifest column (default: the dataset's name)"),
        Flag("uncertain", None, f"CheXpert/MIMIC uncertain labels (-1): negative, positive, or not labelled (default {D.data.uncertain})"),
        Flag("identifiability", None, "after scoring, also fit the confounder probes (site, view, sex, age band; see jobs.aggregate)"),
        Flag("metadata", "URL", "NIH metadata CSV, if not ROOT/Data_Entry_2017[_v2020].csv"),
        Flag("checkpoint", "PATH",
             "state_dict (.pt/.pth, loaded with weights_only=True) or .safetensors; 'random:SEED' for seeded random weights. "
             "Pickled whole models are refused: convert them with python -m jobs.convert_checkpoint --trust-pickle IN OUT"),
        Flag("arch", "NAME|module:callable",
             f"a registered architecture ({', '.join(ARCHITECTURES)}; default {D.model.arch}) or any callable "
             "returning a module with 'features' and a Linear 'classifier'"),
        Flag("findings", "A,B,...|FILE", "finding names in the model's output order (default: the 14 CheXNet findings)", from_file=True),
        Flag("baselines", "reference|from-labels|FILE",
             f"p_baseline per finding for the ln(p_cell/p_baseline) map (default {D.model.baselines}: the reference prevalences)"),
        Flag("out", "URL", "output root (fsspec URL)"),
        Flag("storage_options"),  # its help is jobs._common's (the flag's value is parsed there)
        Flag("input_options"),  # likewise
        Flag("cluster", "NAME", "profile in --cluster-file (default: the file's default, 'local')"),
        Flag("cluster_file", "PATH",
             "profiles file (default: ./cluster.yaml if present, else the built-in local profiles); a missing file is an error"),
        Flag("worker_timeout", "SECONDS", "give up when the cluster brings up no worker in this time (default: the profile's "
             "worker_timeout, 120 s for local clusters, 1800 s for SLURM)"),
        Flag("shard_size", "N", f"images per shard and Zarr chunk length (default {D.compute.shard_size})"),
        Flag("batch_size", "N", f"images per forward pass (default {D.compute.batch_size})"),
        Flag("limit", "N", "score only the first N manifest rows"),
        Flag("device", "auto|cpu|cuda", f"where the model runs on each worker (default {D.compute.device})"),
        Flag("high_bit_depth", None, "16-bit PNGs: 'clip' as the reference's convert('RGB') does, or 'rescale' the full range "
             f"to 8 bits (default {D.images.high_bit_depth})"),
        Flag("cache", "auto|none|URL",
             "preprocessed-image cache (uint8 224x224 in Zarr): 'auto' = OUT/cache (default), 'none', or a URL"),
        Flag("decode_workers", "N", "decode processes per worker, kept alive across shards (default: one per core of the worker; "
             "0: decode in the scoring process)"),
        Flag("precision", None, f"forward precision: {D.model.precision} (default, strict: TF32 off on CUDA, parity <= 1e-4), tf32, "
             "or bf16 (autocast features); part of the run's identity (non-default precisions get their own run folder "
             "runs/VERSION-PRECISION)"),
        Flag("decode_threads", "N", "deprecated alias of --decode-workers"),
        Flag("report", None, "write no HTML report at the end of the run (nightly jobs that only query the tables); "
             "python -m jobs.report --out OUT builds it later"),
        Flag("verify", None, "on resume, rehash every finished shard's outputs against its record (default: sizes only)"),
        Flag("max_failed_fraction", "F", "more failed images than this share ends the run 'partial' with exit 3 "
             f"(default {D.output.max_failed_fraction}); no image scored is always a failure"),
        Flag("max_image_bytes", "N", "larger image files are not read; recorded as ImageTooLarge "
             f"(default {D.images.max_image_bytes // 2**20} MiB; real films are 0.3-10 MB)"),
        Flag("max_image_pixels", "N",
             f"films whose header declares more pixels are not decoded (TooManyPixels; default {D.images.max_image_pixels:,})"),
        Flag("max_aspect_ratio", "R", "films longer than R times their width (or the reverse) are not decoded "
             f"(ExtremeAspectRatio; default {D.images.max_aspect_ratio:g})"),
        Flag("read_timeout", "S", f"seconds per remote read attempt (ReadTimeout; default {D.images.read_timeout:g})"),
        Flag("read_retries", "N", "further attempts after a transient read error (timeout, connection, EIO), with backoff "
             f"(default {D.images.read_retries})"),
        Flag("allow_roots", "URL", "repeatable: a folder or URL prefix that manifest paths may point into besides the "
             "manifest's own folder", repeat=True),
    )


def yaml_text(cfg: ScoreConfig, head: str = "") -> str:
    """The configuration as a --config YAML file, after ``head`` (comment lines). Storage options
    are left out (their values may be credentials); a comment names their keys, to be given again."""
    import yaml

    if cfg.output.storage_options:
        head += (f"# Storage options {_keys(cfg.output.storage_options)} are not written here (they may hold credentials): give them again "
                 "with --storage-option KEY=VALUE or output.storage_options, or leave credentials to the environment.\n")
    if cfg.data.input_options:
        head += (f"# Input options {_keys(cfg.data.input_options)} are not written here (they may hold credentials): give them again "
                 "with --input-option KEY=VALUE or data.input_options, or leave credentials to the environment.\n")
    if cfg.data.dataset_options:
        head += (f"# The options of datasets {_keys(cfg.data.dataset_options)} are not written here (they may hold credentials): "
                 "give them again in data.dataset_options.\n")
    doc = cfg.to_dict()
    masked = _redacted(doc)
    if masked != doc:
        head += ("# Credentials in URLs are masked (REDACTED) here: put them in storage options or the environment, "
                 "not in URLs.\n")
    return head + yaml.safe_dump(masked, sort_keys=False)


def _keys(options) -> str:
    return ", ".join(" ".join(str(k).split()) for k in sorted(options))


def _redacted(value):
    """A configuration value with URL credentials masked in every string, at any depth."""
    from pipeline.core.redact import redact

    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_redacted(v) for v in value)
    return value


def load_yaml(path: str) -> dict:
    """The mapping a --config YAML file holds (a local path or fsspec URL)."""
    import fsspec
    import yaml

    try:
        with fsspec.open(path, "rt") as f:
            doc = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except yaml.YAMLError as e:
        # where and what, without the quoted lines: a file may hold credentials (storage_options)
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        context, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
        if context and cmark is not None:
            context += f" from line {cmark.line + 1}:"
        what = " ".join(filter(None, (context, getattr(e, "problem", None)))) or type(e).__name__
        raise ConfigError(f"--config {path} is not valid YAML{where}: {what}") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"--config {path} must hold a mapping of sections ({', '.join(SECTIONS)}), got {type(doc).__name__}")
    return doc


def load_config(path: str | None = None, overrides: Mapping | None = None, base: ScoreConfig | None = None) -> ScoreConfig:
    """base (default: the defaults), then the YAML file at ``path``, then ``overrides`` (flat keys).
    Storage and input options are merged key by key (--storage-option over the file's
    output.storage_options, --input-option over data.input_options); every other key is replaced whole."""
    cfg = base or ScoreConfig()
    if path:
        cfg = cfg.updated(load_yaml(path), f"--config {path}")
    for key, given in (("storage_options", cfg.output.storage_options), ("input_options", cfg.data.input_options)):
        if overrides and isinstance(overrides.get(key), Mapping):
            overrides = {**overrides, key: {**given, **overrides[key]}}
    return cfg.with_overrides(overrides) if overrides else cfg


# ------------------------------------------------------------------ resolution
@dataclass(frozen=True)
class Resolved:
    """What the configuration's data-dependent choices came to: derived once, before the shard spec."""

    config: ScoreConfig
    baselines: tuple[float, ...]  # p_baseline per finding, in the model's finding order
    cache_root: str | None  # the preprocessed-image cache root, None: off
    device: str  # the device policy every worker resolves (auto | cpu | cuda[:N])

    def saved(self) -> dict:
        """run.json's ``resolved``: the values the run used."""
        return {"baselines": dict(zip(self.config.findings(), self.baselines)), "cache": self.cache_root, "device": self.device}


def resolve(cfg: ScoreConfig, manifest=None) -> Resolved:
    """Baselines (reference, from the labels of ``manifest`` (a pyarrow Table), or from a file), the
    cache root ('auto' -> OUT/cache) and the device policy, in one place."""
    return Resolved(cfg, resolve_baselines(cfg, manifest), resolve_cache(cfg), cfg.compute.device)


def resolve_cache(cfg: ScoreConfig) -> str | None:
    mode = cfg.compute.cache
    from pipeline.inference.images import PREPROCESSING

    if mode == "none" or not PREPROCESSING[cfg.preprocess().method].cacheable:
        return None  # the cache keeps 8-bit films; torchxrayvision's preprocessing yields float32 ones
    return cfg.output.store().cache_root if mode == "auto" else mode


def resolve_baselines(cfg: ScoreConfig, manifest=None) -> tuple[float, ...]:
    from pipeline.core.findings import REFERENCE_BASELINES, parse_baselines_text, validate_baselines

    findings, mode = cfg.findings(), cfg.model.baselines
    if mode == "reference":
        return validate_baselines(findings, REFERENCE_BASELINES)
    if mode == "from-labels":
        if manifest is None:
            raise ConfigError("--baselines from-labels needs the manifest: resolve after it is built")
        prev = {}
        for f in findings:
            vals = [float(v) for v in manifest.column(f).to_pylist() if v is not None]
            mean = sum(vals) / len(vals) if vals else None
            if mean is None or not 0 < mean < 1:
                raise ConfigError(f"--baselines from-labels: {f} has {len(vals)} labels with prevalence "
                                  f"{mean if mean is not None else 'n/a'}; give a baselines file instead")
            prev[f] = mean
        return validate_baselines(findings, prev)
    try:
        with cfg.inputs().at(mode).open(mode="rt") as fh:  # an input: opened with the input options
            return validate_baselines(findings, parse_baselines_text(fh.read()))
    except FileNotFoundError:
        raise ConfigError(f"--baselines file {mode} does not exist; use 'reference', 'from-labels' or a file") from None


# ------------------------------------------------------------------ checks
def _check_values(cfg: ScoreConfig) -> None:
    """What a type cannot say. Messages name the flag, as the job's users know it."""
    c, d, m, o = cfg.compute, cfg.data, cfg.model, cfg.output
    if c.shard_size < 1 or c.batch_size < 1:
        raise ConfigError("--shard-size and --batch-size must be positive")
    if not 0 <= o.max_failed_fraction <= 1:
        raise ConfigError("--max-failed-fraction must be between 0 and 1")
    if d.limit is not None and d.limit < 0:
        raise ConfigError("--limit must be >= 0")
    if c.decode_workers is not None and c.decode_workers < 0:
        raise ConfigError("--decode-workers must be >= 0 (0 decodes in the scoring process itself)")
    if not DEVICE.match(c.device):
        raise ConfigError(f"--device {c.device!r}: use auto, cpu, cuda or cuda:N")
    if not m.findings or len(set(m.findings)) != len(m.findings):
        raise ConfigError("--findings must name each output once")
    if m.checkpoint is not None and m.checkpoint.startswith("random:") and not m.checkpoint[len("random:"):].isdigit():
        raise ConfigError(f"--checkpoint {m.checkpoint!r}: random weights are 'random:SEED' with an integer SEED")
    check_arch(m.arch, find_module=False)  # whether its module is importable: pipeline.run.validate
    cfg.findings()  # a model with its own outputs must have one for some --findings (torch-free)
    bad = [name for name, v in d.dataset_options.items() if not isinstance(v, Mapping)]
    if bad:  # the dataset's name and the type, never the value (it may be a credential)
        raise ConfigError(f"data.dataset_options.{bad[0]} must be a mapping of fsspec options, got {type(d.dataset_options[bad[0]]).__name__}")
    if cfg.cluster.worker_timeout is not None and cfg.cluster.worker_timeout <= 0:
        raise ConfigError("--worker-timeout must be positive")
    a = cfg.aggregate
    if a.min_n < 1 or a.n_boot < 1:
        raise ConfigError(f"{flag_of('aggregate', 'min_n')} and {flag_of('aggregate', 'n_boot')} must be positive")
    if a.anatomy_mask is not None and (not a.anatomy_mask or any(len(r) != len(a.anatomy_mask) or set(r) - {0, 1} for r in a.anatomy_mask)):
        # the model's grid decides the size (aggregation checks it against the maps)
        raise ConfigError("--anatomy-mask must be N rows of N zeros and ones, N the model's grid (7 for 224-px models)")
    try:
        cfg.images.read_limits()
    except ValueError as e:
        raise ConfigError(f"--max-image-bytes/--max-image-pixels/--max-aspect-ratio/--read-timeout/--read-retries: {e}") from None


_HINTS: dict[type, dict] = {}


def _hints(cls: type) -> dict:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _optional(hint) -> tuple[Any, bool]:
    if get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(get_args(hint)) == 2:
            return args[0], True
    return hint, False


def _describe(hint) -> str:
    hint, opt = _optional(hint)
    if get_origin(hint) is Literal:
        text = "one of " + ", ".join(map(str, get_args(hint)))
    elif get_origin(hint) is tuple:
        text = "a list"
    elif hint in (dict, Mapping) or get_origin(hint) in (dict, Mapping):
        text = "a mapping"
    else:
        text = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))
    return text + (" (or null)" if opt else "")


def _type_ok(value, hint) -> bool:
    hint, opt = _optional(hint)
    if value is None:
        return opt
    origin = get_origin(hint)
    if origin is Literal:
        return value in get_args(hint)
    if origin is tuple:
        inner = get_args(hint)[0]
        return isinstance(value, tuple) and all(_type_ok(v, inner) for v in value)
    if hint in (dict, Mapping) or origin in (dict, Mapping):
        return isinstance(value, Mapping)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _check_type(section: str, name: str, value, hint) -> None:
    if not _type_ok(value, hint):
        got = type(value).__name__ if (section, name) in SECRET_OPTIONS else repr(value)  # never quote what may be a credential
        raise ConfigError(f"{flag_of(section, name)} must be {_describe(hint)}, got {got}")


def _coerce(section: str, name: str, value, hint):
    """A value from YAML or a flag, in the field's type: lists become tuples, a single string
    becomes a one-item list, ints become floats, a 7x7 mask may be given as a JSON file."""
    base, _ = _optional(hint)
    if value is None:
        return None
    if (section, name) == ("aggregate", "anatomy_mask") and isinstance(value, str):
        try:
            with open(value) as f:
                value = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--anatomy-mask {value}: cannot read a JSON NxN list of 0/1 (7x7 for 224-px models) ({e})") from None
    if get_origin(base) is tuple:
        inner = get_args(base)[0]
        if isinstance(value, str):
            value = tuple(v.strip() for v in value.split(",") if v.strip()) if (section, name) in _COMMA_LISTS else (value,)
        if isinstance(value, (list, tuple)):
            return tuple(_coerce(section, name, v, inner) if get_origin(inner) is tuple else v for v in value)
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (base in (dict, Mapping) or get_origin(base) in (dict, Mapping)) and isinstance(value, Mapping):
        return dict(value)
    return value


def _plain(value):
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _did_you_mean(key: str, known) -> str:
    import difflib

    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
