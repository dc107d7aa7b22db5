"""The architectures ``--arch`` can name: a registry, plus any ``package.module:callable``.

Importing this module does not import torch (the job validates ``--arch`` before loading it, and
``jobs.benchmark`` takes its ``--arch`` choices from here). Add an architecture with
``ARCHITECTURES.register("name", "package.module:builder")``; a builder takes ``num_classes`` and
returns a CAM-shaped module (a ``features`` module and a Linear ``classifier``).
"""

from __future__ import annotations

import importlib
import importlib.util

from pipeline.core.errors import ConfigError
from pipeline.core.registry import Registry

ARCHITECTURES = Registry("architecture", "--arch")
DEFAULT_ARCH = "densenet121"


def densenet121(num_classes: int):
    from torchvision.models import densenet121 as build

    return build(weights=None, num_classes=num_classes)


ARCHITECTURES.register("densenet121", densenet121, help="torchvision DenseNet-121 (CheXNet's network)")
ARCHITECTURES.register("tiny", "pipeline.inference.tiny_net:tiny_cam_net",
                       help="a tiny stride-32 CAM network (tests, demo, benchmark smoke runs)")


def check_arch(arch: str, find_module: bool = True) -> str:
    """A registered name, or a ``module:callable`` (whose module can be found, with find_module);
    else a ConfigError naming the registered architectures. Imports no architecture."""
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
    if ":" not in arch:
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
