"""Check a scoring configuration before anything slow or anything written.

Runs in well under a second: it imports neither torch nor the cluster classes, reads no image and
creates no folder. The values themselves were checked when the ScoreConfig was built
(pipeline.run.config); here, what the environment says about them (files, modules, the cluster) is
a ConfigError rather than a failure after a manifest build, a model load or a cluster start.
"""

from __future__ import annotations

import importlib.util
import os
import shutil

from pipeline.core.errors import ConfigError
from pipeline.inference.architectures import check_arch
from pipeline.run.config import BASELINE_MODES

def _local_path(url: str) -> str | None:
    """The filesystem path of a local URL, None for remote ones (they are checked when opened)."""
    if url.startswith("file://"):
        return url[len("file://"):]
    return None if "://" in url else url


def _must_exist(url: str | None, flag: str, what: str) -> None:
    path = _local_path(url) if url else None
    if path is not None and not os.path.exists(path):
        raise ConfigError(f"{flag} {url}: no such file. Pass the path of {what}.")


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


def validate(cfg):
    """Raise ConfigError for anything in cfg (a ScoreConfig, whose values were checked when it was
    built) that the environment rules out: missing files, unimportable modules, a cluster profile
    that cannot start here. Returns the cluster Profile. A profiles file the configuration names
    must exist; without one, ./cluster.yaml or the built-in local profiles are used."""
    from pipeline.sources.adapters import DatasetSpec
    from pipeline.run.cluster import load_profile

    d, m = cfg.data, cfg.model
    if not d.datasets:
        raise ConfigError("--dataset is required (run with no arguments for the demo)")
    if not m.checkpoint or not cfg.output.out:
        raise ConfigError("--checkpoint and --out are required (run with no arguments for the demo)")
    specs = [DatasetSpec.parse(x) for x in d.datasets]
    if len({s.name for s in specs}) != len(specs):
        raise ConfigError("two --dataset flags have the same name; name them apart with NAME=ADAPTER:LOCATION")
    for s in specs:
        root = _local_path(s.location)
        if root is not None and not os.path.exists(root):
            raise ConfigError(f"--dataset {s.adapter}:{s.location}: {root} does not exist")
    if not m.checkpoint.startswith("random:"):
        _must_exist(m.checkpoint, "--checkpoint", "a .safetensors or .pt/.pth state_dict")
    check_arch(m.arch)  # a module:callable must be importable
    if m.baselines not in BASELINE_MODES:
        _must_exist(m.baselines, "--baselines", "a JSON/CSV file of baselines, or use 'reference' / 'from-labels'")
    _must_exist(d.metadata, "--metadata", "the metadata CSV")
    out = _local_path(cfg.output.out)
    if out is not None and os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {cfg.output.out} is a file; --out must be a folder (it is created if absent)")
    profile = load_profile(cfg.cluster.profile or None, cfg.cluster.path, required=cfg.cluster.file is not None)
    check_cluster(profile)
    return profile
