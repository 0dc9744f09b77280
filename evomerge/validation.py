"""Loading YAML into pydantic models with one-line, field-naming error messages.

Every config the user writes (recipes, experiments, search spaces, the zoo spec) goes through
``load_yaml``: YAML syntax errors, unknown keys (with a did-you-mean) and bad values all become a
``ConfigError`` of the form ``file: field.path: what was expected``.
"""

from __future__ import annotations

import re

import difflib
from pathlib import Path, PurePath
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ValidationError

from evomerge.errors import ConfigError

M = TypeVar("M", bound=BaseModel)
NAME_MAX = 255
PATH_MAX = 4095


def path_text(value: str) -> str:
    """``value`` if the operating system can look it up as a path (no NUL character, no name over
    ``NAME_MAX`` bytes, at most ``PATH_MAX`` bytes in all), else a ``ValueError`` saying why."""
    if "\x00" in value:
        raise ValueError("expected a path, got text with a NUL character")
    if len(value.encode()) > PATH_MAX:
        raise ValueError(f"expected a path, got {len(value.encode())} bytes (at most {PATH_MAX})")
    for name in PurePath(value).parts:
        if len(name.encode()) > NAME_MAX:
            raise ValueError(f"expected a path, but the name '{name[:24]}…' is longer than {NAME_MAX} bytes")
    return value


PathText = Annotated[str, AfterValidator(path_text)]
"""A string field naming a file or folder: checked with ``path_text`` when the config is read."""


class _Loader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader, except that a tagged scalar that cannot be built (``!!int x``,
    ``!!timestamp nope``) is a YAML error at its line instead of a bare ``ValueError``."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, LookupError, AttributeError, OverflowError):
            problem = f"cannot read {node.value!r} as {node.tag}" if isinstance(node, yaml.ScalarNode) else f"invalid {node.tag}"
            raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark) from None


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file (UTF-8, or UTF-16 with a byte-order mark, as YAML allows); a missing or
    unreadable file, bytes that are not such text, a syntax error and nesting too deep to parse
    are one-line ``ConfigError``s."""
    path = Path(path)
    try:
        path_text(str(path))
    except ValueError as err:
        raise ConfigError(f"{str(path)[:200]!r}: {err}") from None
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the file ({err.strerror or err})") from None
    try:
        data = yaml.load(raw, Loader=_Loader)
    except yaml.reader.ReaderError as err:
        if err.encoding == "unicode":
            raise ConfigError(f"{path}: not YAML text: control character #x{err.character:04x} at byte {err.position}") from None
        raise ConfigError(f"{path}: not UTF-8 text: byte 0x{err.character:02x} at offset {err.position} ({err.reason})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}{where}: invalid YAML: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid YAML: nested too deeply to read") from None
    _refuse_cycles(data, path)
    return data


MAX_DEPTH = 100
"""Deepest nesting a config file may have (evomerge's own files nest fewer than 10 levels)."""


def _refuse_cycles(data: Any, path: Path) -> None:
    """A YAML alias inside its own anchor (``&a [*a]``) makes a structure that contains itself, and
    nesting hundreds of levels deep breaks serializers: no config means either, so each is a
    one-line ``ConfigError``."""
    stack: list[tuple[Any, int]] = [(data, 0)]
    open_ids: list[int] = []
    while stack:
        node, depth = stack.pop()
        del open_ids[depth:]
        if not isinstance(node, (dict, list)):
            continue
        if depth >= MAX_DEPTH:
            raise ConfigError(f"{path}: invalid YAML: nested more than {MAX_DEPTH} levels deep")
        if id(node) in open_ids:
            raise ConfigError(f"{path}: invalid YAML: an alias refers to its own anchor (the structure contains itself)")
        open_ids.append(id(node))
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children)


def validate(model: type[M], data: Any, source: str) -> M:
    """Validate ``data`` as ``model``; the first problem becomes a one-line ``ConfigError``."""
    if data is None:
        raise ConfigError(f"{source}: the file is empty; expected a mapping")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{source}: {describe_validation_error(err, model)}") from None


def load_yaml(model: type[M], path: str | Path) -> M:
    """Read and validate a YAML file as ``model``."""
    return validate(model, read_yaml(path), str(path))


def describe_validation_error(err: ValidationError, model: type[BaseModel]) -> str:
    """One line for the first error: the dotted field path and what was expected."""
    first = err.errors(include_url=False)[0]
    loc = [part for part in first["loc"] if not _is_union_tag(part)]
    field = _dotted(loc) or "(top level)"
    if first["type"] == "extra_forbidden":
        hint = _did_you_mean(model, loc)
        return f"{field}: unknown key{hint}"
    if first["type"] == "missing":
        return f"{field}: required field is missing"
    message = first["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if not loc and _NAMES_A_FIELD.match(message):
        return message  # a model-level check that names the field itself
    return f"{field}: {message}"


_NAMES_A_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\[\d+\])?(\.[A-Za-z_][A-Za-z0-9_]*(\[\d+\])?)*: ")


def _is_union_tag(part: Any) -> bool:
    """pydantic inserts union member names (e.g. 'float', 'list[float]') into error locations."""
    return isinstance(part, str) and ("[" in part or part in {"float", "int", "str", "bool"} or "function-" in part)


def _dotted(loc: list[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _did_you_mean(model: type[BaseModel], loc: list[Any]) -> str:
    """Suggest the closest declared field for an unknown key, following the location into submodels."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int) or not (isinstance(current, type) and issubclass(current, BaseModel)):
            current = _item_model(current)
            if isinstance(part, int):
                continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            return ""
        current = current.model_fields[part].annotation
    current = _item_model(current)
    if not (isinstance(current, type) and issubclass(current, BaseModel)):
        return ""
    fields = list(current.model_fields)
    close = difflib.get_close_matches(str(loc[-1]), fields, n=1)
    known = ", ".join(fields)
    return (f" (did you mean '{close[0]}'?)" if close else "") + f"; expected one of: {known}"


def _item_model(annotation: Any) -> Any:
    """The BaseModel inside ``list[X]``, ``X | None`` or ``dict[str, X]``, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _item_model(arg)
        if found is not None:
            return found
    return None
