"""Name -> implementation registries, one per config group.

Each implementation module registers itself and its structured-config schema, so adding an algorithm, task,
model or PEFT method means one new Python file and one new YAML file under ``conf/<group>/``.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Callable

from hydra.core.config_store import ConfigStore

from metapeft.errors import ConfigError


class Registry:
    def __init__(self, group: str):
        self.group = group
        self._entries: dict[str, Any] = {}
        self._schemas: dict[str, type] = {}

    def register(self, name: str, schema: type) -> Callable[[Any], Any]:
        """Register an implementation and store ``schema`` as ``schema/<group>/<name>`` in Hydra's ConfigStore.

        Schemas live outside the group itself so that sweeping ``<group>='glob(*)'`` finds only real options.
        """

        def decorator(obj: Any) -> Any:
            self._entries[name] = obj
            self._schemas[name] = schema
            ConfigStore.instance().store(group=f"schema/{self.group}", name=name, node=schema)
            return obj

        return decorator

    def get(self, name: str) -> Any:
        if name not in self._entries:
            raise ConfigError(f"{self.group}.name", f"unknown {self.group} '{name}'; valid: {sorted(self._entries)}")
        return self._entries[name]

    def schema(self, name: str) -> type:
        self.get(name)  # an unknown name is refused the same way
        return self._schemas[name]

    def names(self) -> list[str]:
        return sorted(self._entries)


ALGORITHMS = Registry("algorithm")
TASKS = Registry("task")
MODELS = Registry("model")
PEFT_METHODS = Registry("peft")
LOGGERS = Registry("logger")


def import_submodules(package_name: str) -> None:
    """Import every module of a package so that their ``register`` decorators run."""
    package = importlib.import_module(package_name)
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{package_name}.{info.name}")
