"""Name -> implementation registries, one per config group.

Each implementation module registers itself and its structured-config schema, so adding an algorithm, task,
model or PEFT method means one new Python file and one new YAML file under ``conf/<group>/``.

Code outside the package registers the same way (``load_plugins``): an installed package names its modules in the
entry point group ``metapeft.plugins``, or ``METAPEFT_PLUGINS=module[,module...]`` names importable modules (the
directory the command runs in is searched too); their YAML files come through ``hydra.searchpath``.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import pkgutil
import sys
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


PLUGIN_GROUP = "metapeft.plugins"


def load_plugins() -> list[str]:
    """Import every plugin module (entry points in ``metapeft.plugins``, then ``$METAPEFT_PLUGINS``) so that their
    ``register`` decorators run; a plugin that fails to import is refused naming it. Returns the modules loaded."""
    loaded = []
    for entry in importlib.metadata.entry_points(group=PLUGIN_GROUP):
        try:
            entry.load()
        except Exception as error:
            raise ConfigError(PLUGIN_GROUP, f"the plugin entry point '{entry.name} = {entry.value}' failed to load: "
                              f"{type(error).__name__}: {error}") from error
        loaded.append(entry.value)
    names = [n.strip() for n in os.environ.get("METAPEFT_PLUGINS", "").split(",") if n.strip()]
    if names and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())  # a module beside where the command runs, as ``python -m`` would find it
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as error:
            raise ConfigError("METAPEFT_PLUGINS", f"module '{name}' failed to import ({type(error).__name__}: "
                              f"{error}); give importable module names, comma-separated") from error
        loaded.append(name)
    return loaded
