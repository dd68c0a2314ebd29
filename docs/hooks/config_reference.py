"""MkDocs hook: the configuration reference, generated from the config dataclasses (the one place each default
lives), where a page holds the line ``<!-- config-reference -->``."""
from __future__ import annotations

import dataclasses
import inspect
import re

MARKER = "<!-- config-reference -->"


def field_comments(schema: type) -> dict[str, str]:
    """name -> the comment on the line that declares it (``name: type = default  # comment``)."""
    comments: dict[str, str] = {}
    for cls in reversed(schema.__mro__):
        if not dataclasses.is_dataclass(cls):
            continue
        above: list[str] = []  # comment lines just above a field describe it too
        for line in inspect.getsource(cls).splitlines():
            if re.match(r"\s+#", line):
                above.append(line.strip().lstrip("#").strip())
                continue
            match = re.match(r"\s+(\w+): [^#]*?(?:#\s*(?:type: ignore\[\w+\]\s*(?:#\s*)?)?(.*))?$", line)
            if match and (above or match.group(2)):
                comments[match.group(1)] = " ".join([*above, match.group(2) or ""]).strip()
            above = []
    return comments


def default_of(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return ""
    if value == "???":
        return "required"
    if dataclasses.is_dataclass(value):
        return f"see `{type(value).__name__}`"
    return f"`{getattr(value, 'value', value)!r}`".replace("|", "\\|")


def schema_table(schema: type, prefix: str = "") -> str:
    comments = field_comments(schema)
    rows = ["| key | default | what it sets |", "|---|---|---|"]
    for field in dataclasses.fields(schema):
        if field.name == "name":
            continue
        rows.append(f"| `{prefix}{field.name}` | {default_of(field)} | {comments.get(field.name, '')} |")
    return "\n".join(rows)


def mode_table() -> str:
    from pathlib import Path

    import yaml

    from metapeft.config import CONF_DIR

    modes = {p.stem: yaml.safe_load(p.read_text()) for p in sorted(Path(CONF_DIR, "mode").glob("*.yaml"))}
    keys = [k for k in next(iter(modes.values())) if k not in ("defaults", "name")]
    rows = ["| key | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
    rows += [f"| `mode.{key}` | " + " | ".join(f"`{mode.get(key)}`" for mode in modes.values()) + " |" for key in keys]
    return "\n".join(rows)


def reference() -> str:
    from metapeft.config import (
        EvaluationConfig,
        ModeConfig,
        PathsConfig,
        PretrainConfig,
        RunConfig,
        ShotsConfig,
        register_configs,
    )
    from metapeft.finetune import FinetuneConfig
    from metapeft.registry import ALGORITHMS, MODELS, PEFT_METHODS, TASKS

    register_configs()
    parts = ["## Top level", schema_table(RunConfig)]
    parts += ["## The modes", "What `conf/mode/<name>.yaml` sets (the `mode` keys above):", "", mode_table()]
    for key, schema in (("shots", ShotsConfig), ("mode", ModeConfig), ("evaluation", EvaluationConfig),
                        ("pretrain", PretrainConfig), ("finetune", FinetuneConfig), ("paths", PathsConfig)):
        parts += [f"## `{key}`", schema_table(schema, f"{key}.")]
    for group, registry in (("algorithm", ALGORITHMS), ("peft", PEFT_METHODS), ("task", TASKS), ("model", MODELS)):
        parts.append(f"## `{group}`")
        for name in registry.names():
            schema = registry.schema(name)
            parts += [f"### `{group}={name}`", f"`{schema.__module__}.{schema.__name__}`", "",
                      schema_table(schema, f"{group}.")]
    return "\n\n".join(parts) + "\n"


def on_page_markdown(markdown: str, page, config, files) -> str:
    return markdown.replace(MARKER, reference()) if MARKER in markdown else markdown
