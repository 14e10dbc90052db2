"""Reading config files: YAML in, validated values out, every error at once.

The gateway's schema lives in `gateway.config`; this module holds the mechanics it uses:

    read_yaml(path)       the document (`yaml.safe_load`) plus errors for keys given twice;
                          unreadable files and syntax errors raise ConfigError
    Reader(data, path...) typed reads of one mapping that record "path.to.key: message" and go
                          on with the default, `${VAR}` expansion, and an unknown-key check

No message quotes a secret or a `${VAR}` value: values are shown as written in the YAML, and
never for keys read with `secret=True`.
"""

from __future__ import annotations

import difflib
import enum
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import yaml


class ConfigError(Exception):
    """The configuration is invalid. `errors` holds every problem found, each as
    "path.to.key: message"; no message contains a secret value."""

    def __init__(self, errors: str | Iterable[str]) -> None:
        self.errors: tuple[str, ...] = (errors,) if isinstance(errors, str) else tuple(errors)
        super().__init__("\n".join(self.errors))


def read_yaml(path: Path) -> tuple[object, list[str]]:
    """The YAML document at `path`, and an error for each mapping key given twice."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise ConfigError(f"{path}: cannot read config file: {reason}") from None
    try:
        duplicates = _duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader), "", set())
        return yaml.safe_load(text), duplicates
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: {_yaml_problem(exc)}") from None


class _Missing(enum.Enum):
    MISSING = enum.auto()


_MISSING = _Missing.MISSING
_VAR = re.compile(r"\$\{([^}]*)(\}?)")
_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class Reader:
    """Typed reads of one YAML mapping at `path` that record errors instead of raising.

    A failed read appends "path.key: message" to the shared `errors` and returns the default,
    so the walk goes on and reports every problem. Each read marks its key as known;
    `unknown_keys()`, called last, reports the rest.
    """

    def __init__(
        self, data: Mapping[object, object], path: str, env: Mapping[str, str], errors: list[str]
    ) -> None:
        self.data, self.path, self.env, self.errors = data, path, env, errors
        self.known: set[str] = set()
        self.bad: set[str] = set()

    def at(self, key: object) -> str:
        return f"{self.path}.{key}" if self.path else str(key)

    def error(self, key: str, message: str) -> None:
        self.bad.add(key)
        self.errors.append(f"{self.at(key)}: {message}")

    def ok(self, *keys: str) -> bool:
        return self.bad.isdisjoint(keys)

    def has(self, key: str) -> bool:
        self.known.add(key)
        return key in self.data

    def get(self, key: str) -> object:
        self.known.add(key)
        return self.data.get(key, _MISSING)

    def expand(self, key: str, value: str) -> str:
        """Substitute `${VAR}`s from env; errors name the variable, never a value."""

        def substitute(match: re.Match[str]) -> str:
            name, closed = match.groups()
            if not closed or not _VAR_NAME.fullmatch(name):
                self.error(key, "malformed variable reference (expected ${NAME})")
            elif name not in self.env:
                self.error(key, f"environment variable {name} is not set")
            else:
                return self.env[name]
            return ""

        return _VAR.sub(substitute, value)

    def optional_text(self, key: str, *, secret: bool = False) -> str | None:
        value = self.get(key)
        if value is _MISSING:
            return None
        if not isinstance(value, str) or not value:
            self.error(key, "must be a non-empty string" + ("" if secret else got(value)))
            return None
        value = self.expand(key, value)
        if not value and self.ok(key):
            self.error(key, "is empty after ${VAR} substitution")
        return value if self.ok(key) else None

    def text(self, key: str, *, secret: bool = False) -> str:
        """A required non-empty string ("" after an error)."""
        if key not in self.data:
            self.error(key, "required")
        return self.optional_text(key, secret=secret) or ""

    def integer(self, key: str, default: int, *, minimum: int = 1) -> int:
        value = self.get(key)
        if value is _MISSING:
            return default
        if type(value) is not int or value < minimum:  # bool is not a number here
            wanted = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            self.error(key, f"must be {wanted}{got(value)}")
            return default
        return value

    def seconds(self, key: str, default: float, *, allow_zero: bool = False) -> float:
        value = self.get(key)
        if value is _MISSING:
            return default
        if (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and (value > 0 or (allow_zero and value == 0))
        ):
            return float(value)
        bound = ">= 0" if allow_zero else "> 0"
        self.error(key, f"must be a number of seconds {bound}{got(value)}")
        return default

    def number(self, key: str, default: float, *, minimum: float, maximum: float) -> float:
        value = self.get(key)
        if value is _MISSING:
            return default
        number = math.nan  # anything but a number is reported below
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value)
        if not (math.isfinite(number) and minimum <= number <= maximum):
            self.error(key, f"must be a number from {minimum:g} to {maximum:g}{got(value)}")
            return default
        return number

    def boolean(self, key: str, default: bool) -> bool:
        value = self.get(key)
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            self.error(key, f"must be true or false{got(value)}")
            return default
        return value

    def section(self, key: str) -> Reader:
        """The mapping at `key`; an empty one (all defaults) if missing or not a mapping."""
        value = self.get(key)
        if value is _MISSING:
            value = {}
        elif not isinstance(value, Mapping):
            self.error(key, f"must be a mapping{got(value)}")
            value = {}
        return Reader(value, self.at(key), self.env, self.errors)

    def items(
        self, key: str, *, required: bool = True, allow_empty: bool = False
    ) -> list[tuple[str, object]]:
        """(relative key, item) for each item of the list at `key`, e.g. ("routes[0]", {...})."""
        value = self.get(key)
        wanted = "a list" if allow_empty else "a non-empty list"
        if value is _MISSING:
            if required:
                self.error(key, f"required ({wanted})")
            return []
        if not isinstance(value, list) or not (value or allow_empty):
            self.error(key, f"must be {wanted}{got(value)}")
            return []
        return [(f"{key}[{i}]", item) for i, item in enumerate(value)]

    def sections(self, key: str) -> list[Reader]:
        """A reader for each item of the non-empty list of mappings at `key`."""
        readers = []
        for sub, item in self.items(key):
            if isinstance(item, Mapping):
                readers.append(Reader(item, self.at(sub), self.env, self.errors))
            else:
                self.error(sub, f"must be a mapping{got(item)}")
        return readers

    def unknown_keys(self) -> None:
        for key in self.data:
            if key in self.known:
                continue
            notes = []
            if key is True and "retry_on" in self.known:
                notes.append("did you mean retry_on?")
            elif close := difflib.get_close_matches(str(key), sorted(self.known), n=1):
                notes.append(f"did you mean {close[0]}?")
            if isinstance(key, bool):  # YAML 1.1: on/yes are true, off/no are false
                notes.append(
                    "YAML reads a bare 'on' as true" if key else "YAML reads a bare 'off' as false"
                )
            self.errors.append(
                f"{self.at(key)}: unknown key" + (f" ({' '.join(notes)})" if notes else "")
            )


def got(value: object) -> str:
    """Show a value as written in the YAML, before `${VAR}` substitution: ' (got "x")'."""
    if isinstance(value, bool) or value is None:
        shown = {True: "true", False: "false", None: "null"}[value]
    elif isinstance(value, int | float):
        shown = repr(value)
    elif isinstance(value, str):
        shown = f'"{value}"' if len(value) <= 40 else "a long string"
    elif isinstance(value, list | Mapping):
        kind = "list" if isinstance(value, list) else "mapping"
        shown = f"a {kind}" if value else f"an empty {kind}"
    else:
        shown = type(value).__name__  # e.g. a YAML timestamp
    return f" (got {shown})"


def _duplicate_keys(node: yaml.Node | None, path: str, visited: set[int]) -> list[str]:
    """Errors for keys given twice in one mapping (PyYAML silently keeps the last)."""
    if node is None or id(node) in visited:  # anchors and aliases: walk each node once
        return []
    visited.add(id(node))
    errors = []
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            sub = f"{path}.{key}" if path else key
            if key in seen and key != "<<":
                line = key_node.start_mark.line + 1
                errors.append(f"{sub}: duplicate key (line {line}); YAML would keep only the last")
            seen.add(key)
            errors += _duplicate_keys(value_node, sub, visited)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            errors += _duplicate_keys(item, f"{path}[{i}]", visited)
    return errors


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """Position and problem only: PyYAML's full message quotes the offending line, which may
    hold a secret."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}"
        context = f" ({exc.context})" if exc.context else ""
        return f"invalid YAML at {where}: {exc.problem}{context}"
    return f"invalid YAML: {exc}"
