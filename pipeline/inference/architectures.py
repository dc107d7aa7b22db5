"""The architectures ``--arch`` can name: a registry, plus any ``package.module:callable``.

Importing this module does not import torch (the job validates ``--arch`` before loading it, and
``jobs.benchmark`` takes its ``--arch`` choices from here). Add an architecture with
``register_arch("name", "package.module:builder", profile=...)``; a builder takes ``num_classes`` and
returns a CAM-shaped module (a ``features`` module and a Linear ``classifier``). Its ``ModelProfile``
says what else the network expects: the preprocessing that makes its input, the input size, its own
output names and calibration (torchxrayvision's models, ``xrv:...``, differ from CheXNet in all four).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

from pipeline.core.errors import ConfigError, MissingExtraError
from pipeline.core.registry import Registry
from pipeline.inference.xrv_profiles import XRV_MODELS

ARCHITECTURES = Registry("architecture", "--arch")
DEFAULT_ARCH = "densenet121"


@dataclass(frozen=True)
class ModelProfile:
    """What a registered network expects besides its weights (torch-free; see model_spec.model_spec_for).

    ``targets``: the network's own output names, '' for an output it was not trained for; empty: its
    outputs are the run's ``--findings``, in order (CheXNet-style). ``op_threshs``: per output, the
    operating point that calibration maps to 0.5 (NaN: none); empty: uncalibrated. ``preprocess``: the
    entry of ``pipeline.inference.images.PREPROCESSING`` that makes its input from a decoded film.
    ``extra``/``requires``: the pip extra and the modules it needs (checked before anything starts)."""

    preprocess: str = "chexnet"
    input_size: int = 224
    targets: tuple[str, ...] = ()
    op_threshs: tuple[float, ...] = ()
    extra: str | None = None
    requires: tuple[str, ...] = ()


DEFAULT_PROFILE = ModelProfile()
PROFILES: dict[str, ModelProfile] = {}


def register_arch(name: str, builder, help: str = "", profile: ModelProfile = DEFAULT_PROFILE) -> None:
    """One architecture: its builder in ARCHITECTURES and its profile beside it."""
    ARCHITECTURES.register(name, builder, help=help)
    PROFILES[name] = profile


def arch_profile(arch: str) -> ModelProfile:
    """The profile of a registered architecture; a ``module:callable`` one is CheXNet-style."""
    return PROFILES.get(arch, DEFAULT_PROFILE)


def densenet121(num_classes: int):
    from torchvision.models import densenet121 as build

    return build(weights=None, num_classes=num_classes)


register_arch("densenet121", densenet121, help="torchvision DenseNet-121 (CheXNet's network)")
register_arch("tiny", "pipeline.inference.tiny_net:tiny_cam_net",
              help="a tiny stride-32 CAM network (tests, demo, benchmark smoke runs)")

# torchxrayvision's models (the `torchxrayvision` extra): its network, preprocessing, output names and
# calibration; `checkpoint random:SEED` builds them untrained, a converted release file loads into them.
XRV_EXTRA = "torchxrayvision"
for _weights, (_targets, _threshs, _size) in XRV_MODELS.items():
    register_arch(f"xrv:{_weights}", f"pipeline.inference.xrv_nets:{_weights.split('-')[0]}",
                  help=f"torchxrayvision {_weights} ({_size} px, grey, [-1024, 1024]; needs the torchxrayvision extra)",
                  profile=ModelProfile("xrv", _size, _targets, _threshs, XRV_EXTRA, ("torchxrayvision", "skimage")))


def check_requirements(arch: str) -> None:
    """A MissingExtraError naming the pip extra when a module the architecture needs is not installed."""
    profile = arch_profile(arch)
    missing = [m for m in profile.requires if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(
            f"--arch {arch} needs {', '.join(missing)}, which is not installed: install the extra with "
            f"pip install -e \".[{profile.extra}]\" (or pip install cxr-audit[{profile.extra}])")


def check_arch(arch: str, find_module: bool = True) -> str:
    """A registered name, or a ``module:callable`` (whose module can be found, with find_module);
    else a ConfigError naming the registered architectures; with find_module, a MissingExtraError when
    a registered one needs an extra that is not installed. Imports no architecture."""
    if arch in ARCHITECTURES:
        if find_module:
            check_requirements(arch)
        return arch
    if ":" not in arch:
        if arch not in ARCHITECTURES:
            raise ConfigError(f"unknown --arch {arch!r}: registered architectures are {', '.join(ARCHITECTURES)}, "
                              "or give 'package.module:callable'")
        return arch
    if not find_module:
        return arch
    module = arch.split(":", 1)[0]
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ConfigError(f"--arch {arch!r}: module {module!r} cannot be found on the Python path")
    return arch


def build_arch(arch: str, num_classes: int):
    """The network ``arch`` names (a registered name or ``module:callable``), untrained."""
    if arch in ARCHITECTURES or ":" not in arch:
        return ARCHITECTURES[check_arch(arch)](num_classes=num_classes)
    mod_name, fn_name = arch.split(":", 1)
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"--arch {arch!r} cannot be imported ({e}); is the module on PYTHONPATH?") from e
    try:
        return fn(num_classes=num_classes)
    except TypeError:
        return fn()
