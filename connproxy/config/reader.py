"""Reading a configuration: strict YAML, the key schema, typed accessors, and problems collected, not raised one
by one.

A configuration is described once, as a tree of :class:`Key` declarations (name, type, default, meaning; see
:mod:`connproxy.config.proxy` and :mod:`connproxy.config.connector`). The parser walks the YAML with a
:class:`Section` per mapping: a section refuses keys its schema does not declare, and ``section.get(name)`` reads a
value with the declared type and default. A bad value is recorded as a :class:`ConfigProblem` (one line
``<key path>: <problem>``) and the default is used in its place, so that parsing goes on and *every* problem of a
file is reported at once; :meth:`Context.raise_problems` then raises one :class:`ConfigError` holding all of them.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "MISSING",
    "ConfigError",
    "ConfigProblem",
    "Context",
    "Key",
    "Section",
    "read_yaml",
    "show",
]


@dataclass(frozen=True)
class ConfigProblem:
    """One problem of a configuration: ``line`` is what the user reads (``<key path>: <problem> (<file>)``).

    ``key_path`` is the path of the offending key where there is one (``None`` for YAML syntax and file errors).
    """

    line: str
    key_path: str | None = None

    def __str__(self) -> str:
        return self.line


class ConfigError(Exception):
    """The configuration is invalid. ``str(error)`` is the message for the user: one line per problem.

    Each line starts with the key path (``servers.proxy.http.port: ...``); a problem with a file the key names
    ends with that file in parentheses. :attr:`problems` holds them all (at least one); :attr:`key_path` is the
    key path of the first (``None`` for YAML syntax and file errors).
    """

    def __init__(self, message: str, key_path: str | None = None, *,
                 problems: Sequence[ConfigProblem] | None = None) -> None:
        self.problems: tuple[ConfigProblem, ...] = (
            tuple(problems) if problems else (ConfigProblem(message, key_path),)
        )
        super().__init__("\n".join(p.line for p in self.problems))
        self.key_path = self.problems[0].key_path

    @classmethod
    def of(cls, problems: Sequence[ConfigProblem]) -> ConfigError:
        """One error holding ``problems`` (must not be empty)."""
        assert problems, "ConfigError.of needs at least one problem"
        return cls(problems[0].line, problems[0].key_path, problems=problems)

    @property
    def lines(self) -> list[str]:
        """The problems, one line each."""
        return [p.line for p in self.problems]


def show(value: object) -> str:
    """``repr(value)``, cut to 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def join(path: str, key: str) -> str:
    """The key path of ``key`` under ``path``."""
    return f"{path}.{key}" if path else key


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


#: The default of a key that has none (it is required, or its absence means something of its own).
MISSING: Any = _Missing()


class Invalid(Exception):
    """A value was refused; its problem is already recorded in the :class:`Context`. Caught by the caller that
    can carry on without the value (:meth:`Section.get` uses the default)."""


# --------------------------------------------------------------------------------------------------------
# types


class Type:
    """How a leaf value is read and how the reference describes it."""

    #: The type column of the configuration reference.
    description: str = ""

    def read(self, section: Section, name: str, value: object) -> Any:
        """Convert a present, non-null ``value``. :raises Invalid: after ``section.fail(...)``."""
        return value


class Bool(Type):
    description = "boolean"

    def read(self, section: Section, name: str, value: object) -> Any:
        if not isinstance(value, bool):
            raise section.fail(name, f"expected true or false, got {show(value)}")
        return value


@dataclass
class Integer(Type):
    low: int
    high: int | None = None

    @property
    def description(self) -> str:  # type: ignore[override]
        return f"integer {self.low}-{self.high}" if self.high is not None else f"integer >= {self.low}"

    def read(self, section: Section, name: str, value: object) -> Any:
        wanted = f"an {self.description}"
        if isinstance(value, bool) or not isinstance(value, int):
            raise section.fail(name, f"expected {wanted}, got {show(value)}")
        if value < self.low or (self.high is not None and value > self.high):
            raise section.fail(name, f"expected {wanted}, got {show(value)}")
        return value


@dataclass
class Port(Type):
    """A TCP port 1-65535; a ``listener`` port may also be 0 (any free port)."""

    listener: bool

    @property
    def description(self) -> str:  # type: ignore[override]
        return "port 1-65535" + (" (0: any free port)" if self.listener else "")

    def read(self, section: Section, name: str, value: object) -> Any:
        if self.listener and isinstance(value, int) and not isinstance(value, bool) and value == 0:
            return 0
        return Integer(1, 65535).read(section, name, value)


class Seconds(Type):
    """A finite number of seconds above 0 (integer or float)."""

    description = "seconds > 0"

    def read(self, section: Section, name: str, value: object) -> Any:
        wanted = "a number > 0"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise section.fail(name, f"expected {wanted}, got {show(value)}")
        number = float(value)
        if not math.isfinite(number) or number <= 0:
            raise section.fail(name, f"expected {wanted}, got {show(value)}")
        return number


@dataclass
class Text(Type):
    allow_empty: bool = False

    @property
    def description(self) -> str:  # type: ignore[override]
        return "string" if self.allow_empty else "non-empty string"

    def read(self, section: Section, name: str, value: object) -> Any:
        if not isinstance(value, str):
            raise section.fail(name, f"expected a string, got {show(value)}")
        if not self.allow_empty and not value.strip():
            raise section.fail(name, "must not be empty")
        return value


class FilePath(Type):
    """A file path, resolved against the configuration file's folder if relative."""

    description = "file path"

    def read(self, section: Section, name: str, value: object) -> Any:
        text = Text().read(section, name, value)
        path = Path(text).expanduser()
        if section.context.base_dir is not None and not path.is_absolute():
            path = section.context.base_dir / path
        return str(path)


@dataclass
class Choice(Type):
    choices: tuple[str, ...]

    @property
    def description(self) -> str:  # type: ignore[override]
        return " | ".join(self.choices)

    def read(self, section: Section, name: str, value: object) -> Any:
        if not isinstance(value, str) or value not in self.choices:
            raise section.fail(name, f"expected one of {', '.join(self.choices)}, got {show(value)}")
        return value


class BindAddress(Type):
    """An IP address to listen on, normalised (``0:0::0`` becomes ``::``)."""

    description = "IP address"

    def read(self, section: Section, name: str, value: object) -> Any:
        text = Text().read(section, name, value)
        try:
            return str(ipaddress.ip_address(text))
        except ValueError:
            raise section.fail(
                name, f"expected an IP address such as 0.0.0.0, :: or 127.0.0.1, got {show(text)}"
            ) from None


class Custom(Type):
    """A value with its own reader (``read(section, name, value)``)."""

    def __init__(self, description: str, reader: Callable[[Section, str, object], Any]) -> None:
        self.description = description
        self.reader = reader

    def read(self, section: Section, name: str, value: object) -> Any:
        return self.reader(section, name, value)


class Block(Type):
    """A mapping of further keys (read with :meth:`Section.section`)."""

    description = "mapping"


class Entries(Type):
    """A list of mappings of further keys (read with :meth:`Section.entries`)."""

    description = "list of mappings"


# --------------------------------------------------------------------------------------------------------
# schema


@dataclass(frozen=True)
class Key:
    """One configuration key, declared once: the parser reads it by this declaration and the reference
    (``docs/configuration.md``) is generated from it.

    ``default`` is what an absent (or null) key means to the parser (:data:`MISSING`: no value; the parser then
    decides, for example "required" or "same as another key"); ``default_text`` overrides how the reference
    shows it. ``children`` are the keys of a :class:`Block` or of each entry of :class:`Entries`.
    """

    name: str
    type: Type
    default: Any = MISSING
    doc: str = ""
    children: tuple[Key, ...] = ()
    default_text: str | None = None
    #: Shown in the reference's "network" note: this default opens the process beyond loopback.
    exposes: bool = False

    def child(self, name: str) -> Key:
        """The declared child ``name``. :raises KeyError: not declared (a programming error)."""
        for key in self.children:
            if key.name == name:
                return key
        raise KeyError(f"{self.name}.{name} is not declared in the schema")

    @property
    def shown_default(self) -> str:
        """The default as the reference shows it."""
        if self.default_text is not None:
            return self.default_text
        if self.default is MISSING or self.default is None:
            return ""
        if isinstance(self.default, bool):
            return "true" if self.default else "false"
        if isinstance(self.default, float) and self.default.is_integer():
            return str(int(self.default))
        return str(self.default)


def block(name: str, doc: str, *children: Key) -> Key:
    """A :class:`Block` key."""
    return Key(name, Block(), doc=doc, children=children)


def walk(keys: Sequence[Key], path: str = "") -> Iterator[tuple[str, Key]]:
    """Every key under ``keys`` with its path, depth first in declaration order (list entries as ``name[]``)."""
    for key in keys:
        here = join(path, key.name)
        yield here, key
        if key.children:
            yield from walk(key.children, here + "[]" if isinstance(key.type, Entries) else here)


# --------------------------------------------------------------------------------------------------------
# reading


@dataclass
class Context:
    """The state of one parse: where relative paths start, hints for unknown keys, and the problems so far."""

    base_dir: Path | None = None
    #: Unsupported SAP keys per section path (for a better "unknown key" message).
    sap_only: Mapping[str, frozenset[str]] = field(default_factory=dict)
    #: (section path, key) -> the name this configuration uses for it.
    other_names: Mapping[tuple[str, str], str] = field(default_factory=dict)
    problems: list[ConfigProblem] = field(default_factory=list)
    #: Key paths that had a problem: cross-field and file checks skip rules that involve them.
    bad: set[str] = field(default_factory=set)
    #: Connector: the ``accessControl`` index of each rule kept (rules with problems are left out).
    rule_indexes: list[int] | None = None
    #: Every section read (for the test that the parser reads every declared key).
    sections: list[Section] = field(default_factory=list)

    def report(self, key_path: str | None, problem: str, file: str | None = None) -> Invalid:
        """Record a problem (``<key path>: <problem>``, `` (<file>)`` appended if given); return :class:`Invalid`
        for the caller to raise if it cannot go on."""
        line = f"{key_path}: {problem}" if key_path else problem
        if file is not None:
            line += f" ({file})"
        self.problems.append(ConfigProblem(line, key_path))
        if key_path is not None:
            self.bad.add(key_path)
        return Invalid(line)

    def is_bad(self, *key_paths: str) -> bool:
        """Whether any of ``key_paths`` (or a key inside or above one) already had a problem."""
        for path in key_paths:
            for bad in self.bad:
                if bad == path or bad.startswith((path + ".", path + "[")) or path.startswith((bad + ".", bad + "[")):
                    return True
        return False

    def raise_problems(self) -> None:
        """:raises ConfigError: holding every problem recorded, if there is any."""
        if self.problems:
            raise ConfigError.of(self.problems)

    def hint(self, path: str, key: str, names: Sequence[str]) -> str:
        """The parenthesised hint for unknown ``key`` in section ``path``."""
        if key in self.sap_only.get(path, frozenset()):
            return " (a SAP Connectivity proxy setting that connproxy does not support)"
        if (path, key) in self.other_names:
            return f" (did you mean {self.other_names[path, key]!r}?)"
        close = difflib.get_close_matches(key, names, n=1)
        return f" (did you mean {close[0]!r}?)" if close else ""


class Section:
    """A mapping being read at key path ``path`` against its declared ``keys``.

    Unknown keys, non-string keys and a value that is not a mapping are recorded as problems on construction
    (the section then reads as empty or without those keys).
    """

    def __init__(self, value: object, path: str, keys: Sequence[Key], context: Context) -> None:
        self.path = path
        self.context = context
        self.keys: dict[str, Key] = {key.name: key for key in keys}
        #: The declared keys the parser has asked for.
        self.used: set[str] = set()
        context.sections.append(self)
        data: dict[str, object] = {}
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            if path:
                context.report(path, f"expected a mapping, got {show(value)}")
            else:
                context.report(None, f"(top level): expected a mapping, got {show(value)}")
            value = {}
        for key, item in value.items():
            if not isinstance(key, str):
                where = path or "(top level)"
                context.problems.append(ConfigProblem(f"{where}: keys must be strings, got {show(key)} (quote it)",
                                                      path or None))
                continue
            if key not in self.keys:
                context.report(join(path, key), f"unknown key{context.hint(path, key, list(self.keys))}")
                continue
            data[key] = item
        self._data = data

    def at(self, name: str) -> str:
        """The key path of ``name`` in this section."""
        return join(self.path, name)

    def fail(self, name: str, problem: str, file: str | None = None) -> Invalid:
        """Record a problem for key ``name``; return :class:`Invalid` to raise."""
        return self.context.report(self.at(name), problem, file)

    def _declared(self, name: str) -> Key:
        key = self.keys.get(name)
        if key is None:
            raise KeyError(f"{self.at(name)} is read but not declared in the schema")
        self.used.add(name)
        return key

    def raw(self, name: str) -> object:
        """The value of ``name`` as written, or ``None`` if absent or null."""
        self._declared(name)
        return self._data.get(name)

    def has(self, name: str) -> bool:
        """Whether ``name`` is given (and not null)."""
        return self.raw(name) is not None

    def get(self, name: str, default: Any = MISSING) -> Any:
        """The value of ``name`` read with its declared type; its declared default (or ``default``, for a
        default that depends on other keys) if absent, null or invalid (the problem is then recorded)."""
        key = self._declared(name)
        fallback = key.default if default is MISSING else default
        value = self._data.get(name)
        if value is None:
            return None if fallback is MISSING else fallback
        try:
            return key.type.read(self, name, value)
        except Invalid:
            return None if fallback is MISSING else fallback

    def required(self, name: str) -> Any:
        """Like :meth:`get`, but an absent key is a problem ("is required"); ``None`` if absent or invalid."""
        if not self.has(name):
            self.fail(name, "is required")
            return None
        return self.get(name)

    def section(self, name: str) -> Section:
        """The sub-mapping under ``name`` (empty if absent)."""
        key = self._declared(name)
        return Section(self._data.get(name), self.at(name), key.children, self.context)

    def entries(self, name: str) -> list[Section]:
        """The list of mappings under ``name`` (empty if absent), one section per entry (``name[i]``)."""
        key = self._declared(name)
        value = self._data.get(name)
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail(name, f"expected a list, got {show(value)}")
            return []
        return [Section(item, f"{self.at(name)}[{index}]", key.children, self.context)
                for index, item in enumerate(value)]

    def guard(self, read: Callable[[], Any], default: Any = None) -> Any:
        """``read()``, or ``default`` if it raised :class:`Invalid` (its problem is already recorded)."""
        try:
            return read()
        except Invalid:
            return default


# --------------------------------------------------------------------------------------------------------
# YAML


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys within one mapping."""


class _DuplicateKey(Exception):
    pass


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if not isinstance(node, yaml.MappingNode):  # registered for the map tag only
        return loader.construct_yaml_map(node)
    seen: set[tuple[str, str]] = set()
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
            ident = (key_node.tag, key_node.value)
            if ident in seen:
                line = key_node.start_mark.line + 1
                raise _DuplicateKey(f"line {line}: duplicate key {key_node.value!r}")
            seen.add(ident)
    return loader.construct_yaml_map(node)


_StrictLoader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)


def read_yaml(path: str | os.PathLike[str]) -> Mapping[str, Any] | None:
    """The top-level mapping of a YAML file (``None`` for an empty file).

    :raises ConfigError: the file cannot be read, is not YAML, has a duplicate key or is not a mapping (one
        line, starting with the file name).
    """
    name = os.fspath(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"{name}: cannot read the configuration file: {reason}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except _DuplicateKey as exc:
        raise ConfigError(f"{name}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{name}: invalid YAML: {_one_line_yaml_error(exc)}") from None
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError(f"{name}: expected a mapping at the top level, got {show(data)}")
    return data


def _one_line_yaml_error(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if mark is not None and problem:
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return " ".join(str(exc).split())
