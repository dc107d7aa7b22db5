"""Check a scoring configuration before anything slow or anything written.

Runs in well under a second: it imports neither torch nor the cluster classes, reads no image and
creates no folder. The values themselves were checked when the ScoreConfig was built
(pipeline.config.run_config); here, what the environment says about them (files, modules, the cluster) is
a ConfigError rather than a failure after a manifest build, a model load or a cluster start.
"""

from __future__ import annotations

import importlib.util
import os
import shutil

from pipeline.core.errors import ConfigError, ResourceLimitError
from pipeline.inference.architectures import check_arch
from pipeline.config.run_config import BASELINE_MODES

def _local_path(url: str) -> str | None:
    """The filesystem path of a local URL, None for remote ones (they are checked when opened)."""
    if url.startswith("file://"):
        return url[len("file://"):]
    return None if "://" in url else url


def _must_exist(url: str | None, flag: str, what: str) -> None:
    path = _local_path(url) if url else None
    if path is not None and not os.path.exists(path):
        raise ConfigError(f"{flag} {url}: no such file. Pass the path of {what}.")


def _check_nih_root(root: str, location: str) -> None:
    """nih:ROOT is the folder holding Data_Entry_2017*.csv and images/ or images_0XX/images/."""
    from pipeline.sources.adapters import NIH_METADATA

    if not os.path.isdir(root) or any(os.path.exists(os.path.join(root, n)) for n in NIH_METADATA):
        return
    parent = os.path.dirname(os.path.abspath(root.rstrip("/")))
    for up in (parent, os.path.dirname(parent)):
        if any(os.path.exists(os.path.join(up, n)) for n in NIH_METADATA):
            raise ConfigError(f"--dataset nih:{location} is a folder of images inside the ChestX-ray14 folder; "
                              f"pass the folder that holds {NIH_METADATA[0]}: --dataset nih:{up}")
    raise ConfigError(f"--dataset nih:{location}: no {NIH_METADATA[0]} or {NIH_METADATA[2]} in {root}; "
                      "point nih: at the ChestX-ray14 folder, or pass the metadata file with --metadata URL")


def _check_manifest_columns(path: str, location: str) -> None:
    """A manifest file needs image_id and path columns (read from its header only)."""
    if os.path.isdir(path):
        raise ConfigError(f"--dataset manifest:{location} is a folder; pass a CSV or Parquet manifest file")
    try:
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq

            columns = list(pq.read_schema(path).names)
        else:
            import csv
            import gzip

            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8-sig", errors="replace", newline="") as f:
                columns = [c.strip() for c in next(csv.reader([f.readline()]), [])]
    except (OSError, ValueError, EOFError):
        return  # unreadable: the manifest step says why, with its own message
    missing = [c for c in ("image_id", "path") if c not in columns]
    if missing and any(columns):  # an empty file: the manifest step says so
        raise ConfigError(f"--dataset manifest:{location} has no {' or '.join(missing)} column (its columns: {', '.join(columns[:10]) or 'none'}); "
                          "a manifest needs image_id and path (the film's path or URL, relative to the manifest's folder or absolute)")


def check_cluster(profile) -> None:
    """The profile's cluster class is installed and its scheduler command is on PATH (what its
    cluster type says it needs: pipeline.run.cluster.CLUSTER_TYPES)."""
    from pipeline.run.cluster import CLUSTER_TYPES, missing_module

    kind = CLUSTER_TYPES[profile.type]
    if kind.executable and shutil.which(kind.executable) is None:
        raise ConfigError(f"profile {profile.name!r} (type {profile.type}) runs {kind.executable!r}, which is not on PATH here: "
                          "run on a node of that scheduler (a SLURM login node for slurm), or choose another --cluster")
    if kind.module and importlib.util.find_spec(kind.module) is None:
        raise ConfigError(missing_module(profile, kind))


# Measured on the 2-core x86_64 machine (torch 2.14.1 CUDA build, tiny network, 20 films): under
# `ulimit -v` of 2, 3.5 and 6 GB the job died importing torch or scipy ("failed to map segment") or
# starting a thread, each a raw traceback; 8 GB ran.
MIN_ADDRESS_SPACE = 8 * 10**9


def check_address_space(soft: int | None = None) -> None:
    """Refuse to start under an address-space limit (``ulimit -v``) the job cannot run in."""
    import resource

    soft = resource.getrlimit(resource.RLIMIT_AS)[0] if soft is None else soft
    if soft != resource.RLIM_INFINITY and soft < MIN_ADDRESS_SPACE:
        raise ResourceLimitError(f"the address-space limit (ulimit -v) is {soft / 1e9:.1f} GB; every process of this job "
                                 f"needs about {MIN_ADDRESS_SPACE / 1e9:.0f} GB of address space (torch and scipy map their "
                                 "libraries at import). Raise it: ulimit -v unlimited, or ulimit -v 8000000 (KB) at least")


def validate(cfg, profile=None):
    """Raise ConfigError for anything in cfg (a ScoreConfig, whose values were checked when it was
    built) that the environment rules out: missing files, unimportable modules, a cluster profile
    that cannot start here. Returns the cluster Profile: ``profile`` when the caller resolved it
    already, else the one cfg names (``cluster.profile_for``: a profiles file the configuration names
    must exist; without one, ./cluster.yaml or the built-in local profiles are used)."""
    from pipeline.sources.adapters import DatasetSpec
    from pipeline.run.cluster import profile_for

    d, m = cfg.data, cfg.model
    if not d.datasets:
        raise ConfigError("--dataset is required (run with no arguments for the demo)")
    if not m.checkpoint or not cfg.output.out:
        raise ConfigError("--checkpoint and --out are required (run with no arguments for the demo)")
    specs = [DatasetSpec.parse(x) for x in d.datasets]
    if len({s.name for s in specs}) != len(specs):
        raise ConfigError("two --dataset flags have the same name; name them apart with NAME=ADAPTER:LOCATION")
    unknown = sorted(set(d.dataset_options) - {s.name for s in specs})
    if unknown:
        raise ConfigError(f"data.dataset_options names {unknown[0]!r}, which is no --dataset (the datasets are "
                          f"{', '.join(s.name for s in specs)}; name one with NAME=ADAPTER:LOCATION)")
    for s in specs:
        root = _local_path(s.location)
        if root is not None and not os.path.exists(root):
            raise ConfigError(f"--dataset {s.adapter}:{s.location}: {root} does not exist")
        if root is not None and s.adapter == "nih" and not d.metadata:
            _check_nih_root(root, s.location)
        if root is not None and s.adapter == "manifest":
            _check_manifest_columns(root, s.location)
    check_arch(m.arch)  # a module:callable must be importable
    if not m.checkpoint.startswith("random:"):
        _must_exist(m.checkpoint, "--checkpoint", "a .safetensors or .pt/.pth state_dict")
        if _local_path(m.checkpoint) is not None:
            from pipeline.inference.checkpoint_header import check_header

            check_header(m.checkpoint, m.arch, cfg.findings(), cfg.inputs().options_for(m.checkpoint))  # the tensor shapes against --arch, from the header
    if m.baselines not in BASELINE_MODES:
        _must_exist(m.baselines, "--baselines", "a JSON/CSV file of baselines, or use 'reference' / 'from-labels'")
    _must_exist(d.metadata, "--metadata", "the metadata CSV")
    out = _local_path(cfg.output.out)
    if out is not None and os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {cfg.output.out} is a file; --out must be a folder (it is created if absent)")
    profile = profile or profile_for(cfg.cluster)
    check_cluster(profile)
    return profile
