"""Loading the experiment config: defaults, then a YAML file of overrides, then `--set section.field=value`.

The config models live below the stages that read them (stages/config.py); this module only reads what
a user wrote and turns a validation error into one message per field with the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from stages.config import ExperimentConfig


class ConfigError(ValueError):
    """A config a user wrote is wrong; the message names the field and the fix."""


def _parse_value(text: str) -> Any:
    return yaml.safe_load(text)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {part} is not a section")
    node[leaf] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Defaults, then the YAML file (overrides only), then `section.field=value` overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        tree = _read_yaml(Path(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.field=value")
        key, _, value = item.partition("=")
        try:
            _set_path(tree, key.strip(), _parse_value(value))
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({_yaml_problem(err)})") from None
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = ".".join(str(x) for x in e["loc"]) or "config"
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                msg = f"unknown key; valid keys here: {', '.join(_valid_keys(e['loc']))}"
            lines.append(f"{loc}: {msg}")
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines)) from None


def _read_yaml(p: Path) -> dict[str, Any]:
    if not p.exists():
        raise ConfigError(f"config file {p} does not exist")
    if not p.is_file():
        raise ConfigError(f"config file {p} is a folder, not a YAML file; give the file (e.g. configs/asymre.yaml)")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {p} cannot be read as UTF-8 text ({type(err).__name__}: {err})") from None
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as err:
        hint = " (YAML indents with spaces, not tabs)" if "\t" in text else ""
        raise ConfigError(f"config file {p} is not valid YAML: {_yaml_problem(err)}{hint}") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections (e.g. `train:` then `  lr: 1e-4`)")
    return tree


def _yaml_problem(err: yaml.YAMLError) -> str:
    """The YAML error in one line, with its line and column (1-based) where PyYAML knows them."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def _valid_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = ExperimentConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            break
        model = field.annotation
    return sorted(model.model_fields)
