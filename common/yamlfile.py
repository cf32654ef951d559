"""YAML loading that remembers where each key came from.

Operators edit YAML by hand; an error message that names the file, line and key path
("routing.yaml:14 rules[2].match.any[0].regex") is what makes a config check useful.
"""

from __future__ import annotations

import difflib
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

KeyPath = tuple[str | int, ...]
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Problem:
    """One configuration problem: where it is and what is wrong."""

    file: str
    line: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(Exception):
    """Raised with every problem found in a configuration file."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def format_path(path: Iterable[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


@dataclass
class YamlDocument:
    """Parsed YAML data with a line number for every key path."""

    file: str
    data: Any
    lines: dict[KeyPath, int]

    def line_of(self, path: KeyPath) -> int | None:
        """Line of the deepest known prefix of `path` (pydantic may point below a leaf)."""
        for cut in range(len(path), -1, -1):
            if tuple(path[:cut]) in self.lines:
                return self.lines[tuple(path[:cut])]
        return None

    def problem(self, path: KeyPath, message: str) -> Problem:
        return Problem(self.file, self.line_of(path), format_path(path), message)


def _walk(node: yaml.Node, path: KeyPath, lines: dict[KeyPath, int]) -> None:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = path + (str(key.value),)
            _walk(value, child, lines)
            lines[child] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _walk(item, path + (index,), lines)


def load_yaml(path: str | Path) -> YamlDocument:
    """Read a YAML file; syntax errors become a ConfigError with the line."""
    path = Path(path)
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([Problem(name, None, "", f"cannot read file: {exc.strerror}")]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        reason = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([Problem(name, line, "", f"invalid YAML: {reason}")]) from None
    lines: dict[KeyPath, int] = {}
    if node is not None:
        _walk(node, (), lines)
    return YamlDocument(name, data if data is not None else {}, lines)


def validate(doc: YamlDocument, model: type[M], prefix: KeyPath = ()) -> M:
    """Validate `doc.data` against a pydantic model, mapping errors to file lines."""
    try:
        return model.model_validate(doc.data, context={"document": doc})
    except ValidationError as exc:
        raise ConfigError(
            [doc.problem(prefix + tuple(err["loc"]), _message(model, err)) for err in exc.errors()]
        ) from None


def _message(model: type[BaseModel], err: Any) -> str:
    """pydantic's message; for an unknown key, the known key it is closest to (a typo), if any."""
    if err["type"] != "extra_forbidden":
        return str(err["msg"])
    fields = _fields_at(model, tuple(err["loc"][:-1]))
    close = difflib.get_close_matches(str(err["loc"][-1]), fields, n=1, cutoff=0.6) if fields else []
    if close:
        return f"unknown key (did you mean {close[0]!r}?)"
    return "unknown key" + (f" (known here: {', '.join(sorted(fields))})" if fields and len(fields) <= 12 else "")


def _fields_at(model: Any, path: tuple[Any, ...]) -> list[str]:
    """The field names of the model found by following `path` (field names, then for a dict of
    models its key, for a list of models its index)."""
    skip = False  # the next step is a dict key or a list index, not a field name
    for step in path:
        if skip or isinstance(step, int):
            skip = False
            continue
        fields = getattr(model, "model_fields", None)
        if fields is None or step not in fields:
            return []
        annotation = fields[step].annotation
        model = _model_of(annotation)
        if model is None:
            return []
        skip = _is_collection(annotation)
    fields = getattr(model, "model_fields", None)
    return list(fields) if fields else []


def _is_collection(annotation: Any) -> bool:
    """dict[str, X] or list[X] (optional or not): the next step of a path is a key or an index."""
    origin = typing.get_origin(annotation)
    if origin in (dict, list):
        return True
    return any(_is_collection(arg) for arg in typing.get_args(annotation))


def _model_of(annotation: Any) -> Any:
    """The pydantic model inside an annotation (X, X | None, list[X], dict[str, X])."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in reversed(typing.get_args(annotation)):
        found = _model_of(arg)
        if found is not None:
            return found
    return None
