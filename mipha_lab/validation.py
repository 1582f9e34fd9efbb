"""Strict YAML loading and schema validation with messages that name the file and the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from mipha_lab.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """Base of every schema: unknown keys are errors, values are not silently coerced to strings."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with the safe loader; errors name the file and line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror})") from err
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({getattr(err, 'problem', err)})") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, found {type(data).__name__}")
    return data


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The schema classes an annotation can hold (through Annotated, unions and lists)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]


def _allowed_fields(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names allowed at `loc` (the parent of an unknown key), when it is a nested model; a
    union's member is named in `loc` by its tag (`trainable.vision.full.r`)."""
    current: list[type[BaseModel]] = [model]
    for part in loc:
        if isinstance(part, int):  # an item of a list[Model]
            continue
        tagged = [
            m for m in current if part not in m.model_fields and any(f.default == part for f in m.model_fields.values())
        ]
        if tagged:
            current = tagged
            continue
        owner = next((m for m in current if part in m.model_fields), None)
        if owner is None:
            return []
        current = _models_in(owner.model_fields[part].annotation)
    return sorted(current[0].model_fields) if len(current) == 1 else []


def validate(model: type[M], data: dict[str, Any], source: str | Path) -> M:
    """Validate `data` against `model`; on failure raise one ConfigError listing every bad key."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        lines = []
        for problem in err.errors():
            loc = tuple(problem["loc"])
            key = ".".join(str(p) for p in loc) or "<top level>"
            if problem["type"] == "extra_forbidden":
                allowed = _allowed_fields(model, loc[:-1])
                lines.append(f"unknown key '{key}' (allowed: {', '.join(allowed)})")
            elif problem["type"] == "missing":
                lines.append(f"missing required key '{key}'")
            else:
                lines.append(f"key '{key}': {problem['msg']} (got {problem.get('input')!r})")
        raise ConfigError(f"{source}: " + "; ".join(lines)) from None
