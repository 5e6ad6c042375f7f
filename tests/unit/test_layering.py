"""Layering: ``connproxy.wire`` is the sans-IO core and imports only the standard library and itself.

No Twisted, no zope, no other connproxy package: the core must stay usable (and testable) without a reactor.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WIRE = ROOT / "connproxy" / "wire"
PACKAGE = "connproxy.wire"
STDLIB = frozenset(sys.stdlib_module_names)


def wire_modules() -> list[Path]:
    modules = sorted(WIRE.rglob("*.py"))
    assert WIRE / "session.py" in modules and WIRE / "frames.py" in modules
    return modules


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def allowed(name: str) -> bool:
    return name.split(".")[0] in STDLIB or name == PACKAGE or name.startswith(PACKAGE + ".")


def resolve_relative(path: Path, level: int, module: str | None) -> str:
    """The absolute name ``from <dots><module> import ...`` refers to inside ``path``."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package.pop()
    if level - 1 > len(package):
        return "<beyond the top-level package>"
    base = package[: len(package) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imports_of(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, including dynamic ones with a literal name.

    ``source`` replaces the file's text (``path`` still places relative imports).
    """
    text = path.read_text(encoding="utf-8") if source is None else source
    tree = ast.parse(text, filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                found.append((node.lineno, resolve_relative(path, node.level, node.module)))
            else:
                assert node.module is not None
                if node.module == "connproxy":  # from connproxy import reload: the module connproxy.reload
                    found.extend((node.lineno, f"connproxy.{alias.name}") for alias in node.names)
                else:
                    found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if name in ("__import__", "import_module") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return sorted(found)


@pytest.mark.parametrize("path", wire_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_wire_imports_only_the_standard_library(path: Path) -> None:
    bad = [f"{path.relative_to(ROOT)}:{line}: {name}" for line, name in imports_of(path) if not allowed(name)]
    assert not bad, "connproxy.wire must import only the standard library and itself:\n" + "\n".join(bad)


def test_the_checker_catches_forbidden_imports() -> None:
    """Guard the guard: each forbidden import below must be reported, the allowed ones must not."""
    source = (
        "import twisted.internet\n"
        "from zope.interface import implementer\n"
        "from connproxy.tunnel import stream\n"
        "from .. import auth\n"
        "import importlib\n"
        "importlib.import_module('yaml')\n"
        "__import__('OpenSSL')\n"
        "import json, struct\n"
        "from . import frames\n"
        "from .errors import ErrorCode\n"
        "from connproxy.wire.errors import ProtocolError\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from twisted.python.failure import Failure\n"
    )
    names = [name for _, name in imports_of(WIRE / "probe.py", source)]
    assert [n for n in names if not allowed(n)] == [
        "twisted.internet",
        "zope.interface",
        "connproxy.tunnel",
        "connproxy",
        "yaml",
        "OpenSSL",
        "twisted.python.failure",
    ]
    assert {"connproxy.wire", "connproxy.wire.errors", "json", "struct", "importlib", "typing"} <= set(names)


def test_importing_wire_loads_no_third_party_module() -> None:
    """The same at run time, in a fresh interpreter: nothing outside the standard library gets imported."""
    names = [module_name(p) for p in wire_modules()]
    code = (
        "import sys\n"
        "before = set(sys.modules)\n"
        f"for name in {names!r}:\n"
        "    __import__(name)\n"
        "new = set(sys.modules) - before\n"
        "bad = sorted(m for m in new if m.split('.')[0] not in sys.stdlib_module_names"
        " and m != 'connproxy' and m != 'connproxy.wire' and not m.startswith('connproxy.wire.'))\n"
        "print('\\n'.join(bad))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"third-party modules loaded by connproxy.wire:\n{result.stdout}"


# ------------------------------------------------------------------------------------------------ the whole table

#: What each part of connproxy may import (besides the standard library and itself). ``"*"`` means any
#: third-party module; ``forbid`` lists the connproxy packages a part must never reach.
THIRD_PARTY_TWISTED = ("twisted", "zope", "OpenSSL", "service_identity", "cryptography")
LAYERS: dict[str, dict[str, tuple[str, ...]]] = {
    "connproxy.wire": {"allow": ()},
    "connproxy.tunnel": {"allow": ("connproxy.wire", "connproxy.nodelay", *THIRD_PARTY_TWISTED)},
    "connproxy.http": {"allow": ("connproxy.wire", "connproxy.relay", "h11", *THIRD_PARTY_TWISTED)},
    "connproxy.pki": {"allow": ("cryptography", "OpenSSL", "twisted", "zope", "service_identity", "jwt")},
    "connproxy.config": {"allow": ("connproxy.pki", "connproxy.wire", "yaml", "cryptography", "OpenSSL")},
    "connproxy.obs": {"allow": ("connproxy.config", "twisted", "zope", "prometheus_client")},
    "connproxy.relay": {"allow": ("twisted", "zope")},
    "connproxy.listener": {"allow": ("connproxy.config", "twisted", "zope")},
    "connproxy.twistd": {"allow": ("connproxy.config", "connproxy.obs", "connproxy.pki", "twisted")},
    "connproxy.testing": {"allow": ("connproxy.pki", "cryptography")},
    "connproxy.nodelay": {"allow": ("twisted", "zope")},
    "connproxy.probes": {"allow": ("connproxy.nodelay", "twisted", "zope", "prometheus_client")},
    "connproxy.reload": {"allow": ("connproxy.config", "twisted", "zope")},
    "connproxy.proxy": {"allow": ("*",), "forbid": ("connproxy.connector",)},
    "connproxy.connector": {"allow": ("*",), "forbid": ("connproxy.proxy",)},
}


def layer_of(module: str) -> str | None:
    """The entry of :data:`LAYERS` a connproxy module belongs to (the longest matching prefix)."""
    best = None
    for layer in LAYERS:
        if (module == layer or module.startswith(layer + ".")) and (best is None or len(layer) > len(best)):
            best = layer
    return best


def layer_allows(layer: str, name: str) -> bool:
    rule = LAYERS[layer]
    if any(name == f or name.startswith(f + ".") for f in rule.get("forbid", ())):
        return False
    if name.split(".")[0] in STDLIB or name == layer or name.startswith(layer + "."):
        return True
    if name == "connproxy":
        return False
    if name.startswith("connproxy."):
        return "*" in rule["allow"] or any(name == a or name.startswith(a + ".") for a in rule["allow"])
    return "*" in rule["allow"] or name.split(".")[0] in rule["allow"]


def all_modules() -> list[Path]:
    return sorted(p for p in (ROOT / "connproxy").rglob("*.py"))


def test_every_module_belongs_to_a_layer() -> None:
    """A new top-level module must be placed in the table on purpose (cli and demo assemble both roles)."""
    unplaced = [module_name(p) for p in all_modules()
                if layer_of(module_name(p)) is None and module_name(p) not in ("connproxy", "connproxy.cli", "connproxy.probe",
                                                                               "connproxy.demo")]
    assert not unplaced, f"modules outside the layering table: {unplaced}"


@pytest.mark.parametrize("path", all_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_the_layering_table(path: Path) -> None:
    layer = layer_of(module_name(path))
    if layer is None:
        return
    bad = [f"{path.relative_to(ROOT)}:{line}: {name}" for line, name in imports_of(path)
           if not layer_allows(layer, name)]
    assert not bad, f"{layer} may not import these:\n" + "\n".join(bad)


def test_the_table_refuses_what_it_should() -> None:
    assert not layer_allows("connproxy.connector", "connproxy.proxy.auth")
    assert not layer_allows("connproxy.proxy", "connproxy.connector.dialer")
    assert not layer_allows("connproxy.config", "connproxy.proxy.auth")
    assert not layer_allows("connproxy.tunnel", "connproxy.proxy.replies")
    assert not layer_allows("connproxy.http", "connproxy.proxy.http_frontend")
    assert not layer_allows("connproxy.wire", "twisted.internet")
    assert layer_allows("connproxy.connector", "connproxy.tunnel.stream")
    assert layer_allows("connproxy.http", "connproxy.relay")


def modules_loaded_by(entry: list[str]) -> list[str]:
    """The connproxy and third-party modules a fresh interpreter loads for ``entry`` (in import order)."""
    code = (
        "import sys\n"
        "before = set(sys.modules)\n"
        f"for name in {entry!r}:\n"
        "    __import__(name)\n"
        "print('\\n'.join(sorted(m for m in set(sys.modules) - before if m.split('.')[0] not in sys.stdlib_module_names)))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


CONNECTOR_ENTRY = ["connproxy.connector.tap", "connproxy.connector.service", "connproxy.connector.dialer"]
PROXY_ENTRY = ["connproxy.proxy.tap", "connproxy.proxy.service"]


def test_the_connector_loads_nothing_of_the_proxy_and_no_jwt() -> None:
    loaded = modules_loaded_by(CONNECTOR_ENTRY)
    assert "connproxy.connector.dialer" in loaded  # the probe did import something
    bad = [m for m in loaded if m.startswith("connproxy.proxy") or m.split(".")[0] == "jwt"]
    assert not bad, f"the connector loads proxy code: {bad}"


def test_the_proxy_loads_nothing_of_the_connector() -> None:
    loaded = modules_loaded_by(PROXY_ENTRY)
    assert "connproxy.proxy.service" in loaded
    bad = [m for m in loaded if m.startswith("connproxy.connector")]
    assert not bad, f"the proxy loads connector code: {bad}"
