"""A name -> implementation table that says what is registered when a name is not.

Dataset adapters (``pipeline.sources.source_base.ADAPTERS``) and architectures
(``pipeline.inference.architectures.ARCHITECTURES``) are registries: a new one is one
``register`` call (or decorator), not another branch of an if-chain. An entry may be given as a
``"package.module:attr"`` string, imported on first use, so a registry can list modules that
import it (no import cycle) and naming the choices never imports torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.core.errors import ConfigError


@dataclass(frozen=True)
class Entry:
    name: str
    target: Any  # the object, or "package.module:attr" (imported on first use)
    help: str = ""


class Registry(Mapping[str, Any]):
    """``what`` names the kind of thing ("dataset adapter"), ``flag`` the option that chooses it."""

    def __init__(self, what: str, flag: str):
        self.what, self.flag = what, flag
        self._entries: dict[str, Entry] = {}
        self._loaded: dict[str, Any] = {}

    def register(self, name: str, target: Any = None, help: str = "") -> Callable:
        """``register(name, obj)`` or ``register(name, "module:attr")``, or as a decorator:
        ``@REGISTRY.register(name)``. A name is registered once."""

        def add(obj):
            if name in self._entries:
                raise ValueError(f"{self.what} {name!r} is already registered")
            self._entries[name] = Entry(name, obj, help)
            return obj

        return add if target is None else add(target)

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)
        self._loaded.pop(name, None)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def help(self, name: str) -> str:
        return self._entries[name].help

    def check(self, name: str) -> str:
        """The name, or a ConfigError listing the registered names."""
        if name not in self._entries:
            raise ConfigError(f"unknown {self.flag} {self.what} {name!r}; registered: {', '.join(self._entries)}")
        return name

    def __getitem__(self, name: str) -> Any:
        self.check(name)
        if name not in self._loaded:
            target = self._entries[name].target
            if isinstance(target, str):
                module, attr = target.split(":", 1)
                target = getattr(importlib.import_module(module), attr)
            self._loaded[name] = target
        return self._loaded[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}: {', '.join(self._entries)})"
