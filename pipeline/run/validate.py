"""Check a scoring configuration before anything slow or anything written.

Runs in well under a second: it imports neither torch nor the cluster classes, reads no image and
creates no folder. Every problem it can see from the flags alone is a ConfigError here rather than
after a manifest build, a model load or a cluster start.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil

from pipeline.core.errors import ConfigError

DEVICES = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
# what each cluster type needs installed, and how to get it
_NEEDS_MODULE = {"local-cuda": ("dask_cuda", "cuda"), "slurm": ("dask_jobqueue", "slurm"), "kubernetes": ("dask_kubernetes", "kubernetes")}


def _local_path(url: str) -> str | None:
    """The filesystem path of a local URL, None for remote ones (they are checked when opened)."""
    if url.startswith("file://"):
        return url[len("file://"):]
    return None if "://" in url else url


def _must_exist(url: str | None, flag: str, what: str) -> None:
    path = _local_path(url) if url else None
    if path is not None and not os.path.exists(path):
        raise ConfigError(f"{flag} {url}: no such file. Pass the path of {what}.")


def _check_arch(arch: str) -> None:
    if ":" not in arch:
        if arch != "densenet121":  # the one built-in name (pipeline.inference.model.build_arch)
            raise ConfigError(f"unknown --arch {arch!r}: use 'densenet121' or 'package.module:callable'")
        return
    module = arch.split(":", 1)[0]
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ConfigError(f"--arch {arch!r}: module {module!r} cannot be found on the Python path")


def check_cluster(profile) -> None:
    """The profile's cluster class is installed and its scheduler tools are on PATH."""
    if profile.type == "slurm" and shutil.which("sbatch") is None:
        raise ConfigError(f"profile {profile.name!r} submits SLURM jobs, but there is no 'sbatch' on PATH: "
                          "run on a SLURM login node, or choose another --cluster")
    need = _NEEDS_MODULE.get(profile.type)
    if need and importlib.util.find_spec(need[0]) is None:
        raise ConfigError(f"profile {profile.name!r} (type {profile.type}) needs {need[0]}: pip install 'cxr-audit[{need[1]}]'")


def validate(cfg, cluster_file_given: bool | None = None):
    """Raise ConfigError for anything wrong in cfg (a ScoreConfig); return the cluster Profile.
    cluster_file_given: the user named the profiles file, so it must exist (default: when it is not
    the default ./cluster.yaml, which falls back to the built-in local profiles)."""
    if cluster_file_given is None:
        cluster_file_given = cfg.cluster_file != "cluster.yaml"
    from pipeline.sources.adapters import DatasetSpec
    from pipeline.run.cluster import load_profile

    if not cfg.datasets:
        raise ConfigError("--dataset is required (run with no arguments for the demo)")
    specs = [DatasetSpec.parse(d) for d in cfg.datasets]
    if len({s.name for s in specs}) != len(specs):
        raise ConfigError("two --dataset flags have the same name; name them apart with NAME=ADAPTER:LOCATION")
    for s in specs:
        root = _local_path(s.location)
        if root is not None and not os.path.exists(root):
            raise ConfigError(f"--dataset {s.adapter}:{s.location}: {root} does not exist")
    if not cfg.checkpoint.startswith("random:"):
        _must_exist(cfg.checkpoint, "--checkpoint", "a .safetensors or .pt/.pth state_dict")
    elif not cfg.checkpoint[len("random:"):].isdigit():
        raise ConfigError(f"--checkpoint {cfg.checkpoint!r}: random weights are 'random:SEED' with an integer SEED")
    _check_arch(cfg.arch)
    if not cfg.findings or len(set(cfg.findings)) != len(cfg.findings):
        raise ConfigError("--findings must name each output once")
    if cfg.baselines not in ("reference", "from-labels"):
        _must_exist(cfg.baselines, "--baselines", "a JSON/CSV file of baselines, or use 'reference' / 'from-labels'")
    _must_exist(cfg.metadata, "--metadata", "the metadata CSV")
    if not DEVICES.match(cfg.device):
        raise ConfigError(f"--device {cfg.device!r}: use auto, cpu, cuda or cuda:N")
    if cfg.decode_threads is not None and cfg.decode_threads < 1:
        raise ConfigError("--decode-threads must be at least 1")
    out = _local_path(cfg.out)
    if out is not None and os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {cfg.out} is a file; --out must be a folder (it is created if absent)")
    profile = load_profile(cfg.cluster or None, cfg.cluster_file, required=cluster_file_given)
    check_cluster(profile)
    return profile
