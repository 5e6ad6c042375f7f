"""The ``twistd`` plugins: discoverable, well-formed, cheap to import, and strict about configuration."""

from __future__ import annotations

import ast
import errno
import importlib
import io
import sys
import tempfile
from pathlib import Path
from typing import Any
from unittest import mock

from twisted.application.service import IServiceMaker, Service
from twisted.internet.error import CannotListenError
from twisted.plugin import IPlugin, getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

ROOT = Path(__file__).resolve().parents[2]
PLUGIN_FILE = ROOT / "twisted" / "plugins" / "connproxy_plugin.py"
TAPNAMES = {"connproxy": "connproxy.proxy.tap", "connproxy-connector": "connproxy.connector.tap"}


class DiscoveryTests(SynchronousTestCase):
    def test_both_plugins_are_found_and_provide_iservicemaker(self) -> None:
        ours = {p.tapname: p for p in getPlugins(IServiceMaker) if p.tapname in TAPNAMES}
        self.assertEqual(set(ours), set(TAPNAMES))
        for tapname, plugin in ours.items():
            self.assertTrue(verifyObject(IServiceMaker, plugin))
            self.assertTrue(verifyObject(IPlugin, plugin))
            self.assertEqual(plugin.module, TAPNAMES[tapname])
            self.assertTrue(plugin.description)
            self.assertIsInstance(plugin.options(), usage.Options)

    def test_tap_modules_have_options_and_make_service(self) -> None:
        for module_name in TAPNAMES.values():
            module = importlib.import_module(module_name)
            self.assertTrue(callable(module.makeService))
            options = module.Options()
            options.parseOptions(["--config", "x.yaml"])
            self.assertEqual(options["config"], "x.yaml")


class PackagingTests(SynchronousTestCase):
    def test_no_init_in_twisted_or_twisted_plugins(self) -> None:
        self.assertTrue(PLUGIN_FILE.is_file())
        self.assertFalse((ROOT / "twisted" / "__init__.py").exists())
        self.assertFalse((ROOT / "twisted" / "plugins" / "__init__.py").exists())

    def test_plugin_file_imports_nothing_but_service_maker(self) -> None:
        tree = ast.parse(PLUGIN_FILE.read_text(encoding="utf-8"))
        imports = [node for node in ast.walk(tree) if isinstance(node, ast.Import | ast.ImportFrom)]
        self.assertEqual(len(imports), 1, ast.dump(tree))
        (imp,) = imports
        self.assertIsInstance(imp, ast.ImportFrom)
        assert isinstance(imp, ast.ImportFrom)
        self.assertEqual(imp.module, "twisted.application.service")
        self.assertEqual([alias.name for alias in imp.names], ["ServiceMaker"])
        # Every other top-level statement builds a ServiceMaker naming one of our tap modules (as a string,
        # so that nothing of connproxy is imported when twistd lists its plugins).
        modules = []
        for node in tree.body:
            if node is imp:
                continue
            self.assertIsInstance(node, ast.Assign)
            assert isinstance(node, ast.Assign)
            call = node.value
            self.assertIsInstance(call, ast.Call)
            assert isinstance(call, ast.Call)
            self.assertEqual(getattr(call.func, "id", None), "ServiceMaker")
            self.assertTrue(all(isinstance(arg, ast.Constant) for arg in call.args))
            modules.append(call.args[1].value)  # type: ignore[attr-defined]
        self.assertCountEqual(modules, list(TAPNAMES.values()))

    def test_plugin_file_is_not_named_after_the_package(self) -> None:
        self.assertNotEqual(PLUGIN_FILE.stem, "connproxy")


class BadConfigTests(SynchronousTestCase):
    """A bad configuration stops makeService with exit status 2 and one line per problem on stderr, no traceback."""

    def setUp(self) -> None:
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.tmp = Path(tmp.name)

    def make(self, module_name: str, yaml_text: str | None, path: Path | None = None) -> str:
        if path is None:
            path = self.tmp / "config.yaml"
            path.write_text(yaml_text or "", encoding="utf-8")
        module = importlib.import_module(module_name)
        options = module.Options()
        options.parseOptions(["--config", str(path)])
        err = io.StringIO()
        with mock.patch.object(sys, "__stderr__", err), self.assertRaises(SystemExit) as caught:
            module.makeService(options)
        self.assertEqual(caught.exception.code, 2)
        text = err.getvalue()
        self.assertNotIn("Traceback", text)
        return text

    def test_proxy_unknown_key_is_named(self) -> None:
        text = self.make("connproxy.proxy.tap", "tenantMode: dedicated\nsubaccountId: t\nbogusKey: 1\n")
        self.assertIn("bogusKey: unknown key\n", text)

    def test_proxy_bad_value_is_named_with_its_path(self) -> None:
        text = self.make("connproxy.proxy.tap", "servers:\n  proxy:\n    socks5:\n      port: 99999\n")
        self.assertIn("servers.proxy.socks5.port: expected an integer 1-65535, got 99999\n", text)

    def test_connector_bad_value_is_named_with_its_path(self) -> None:
        text = self.make("connproxy.connector.tap", "subaccountId: t\nreconnect:\n  fastRetries: -3\n")
        self.assertEqual(text, "reconnect.fastRetries: expected an integer >= 0, got -3\n")

    def test_missing_file(self) -> None:
        text = self.make("connproxy.proxy.tap", None, self.tmp / "missing.yaml")
        self.assertIn("missing.yaml: cannot read the configuration file", text)


class StartupFailureTests(SynchronousTestCase):
    """Failures after the configuration checked out: a bind failure is one line naming the key; a bug shows its
    traceback and a line saying it is a bug."""

    def run_failing(self, start: Any) -> tuple[int | str | None, str]:
        from connproxy import twistd

        class Failing(Service):
            def privilegedStartService(self) -> None:
                start()

        service = Failing()
        twistd.guard_start(service)
        err = io.StringIO()
        with mock.patch.object(sys, "__stderr__", err), self.assertRaises(SystemExit) as caught:
            service.privilegedStartService()
        return caught.exception.code, err.getvalue()

    def test_bind_failure_is_one_line_naming_the_key(self) -> None:
        from connproxy.listener import ListenError

        def start() -> None:
            error = CannotListenError("127.0.0.1", 20003, OSError(errno.EADDRINUSE, "Address already in use"))
            raise ListenError("servers.proxy.http.port", error)

        code, text = self.run_failing(start)
        self.assertEqual(code, 2)
        self.assertEqual(text, "servers.proxy.http.port: port 20003 is already in use (127.0.0.1:20003)\n")

    def test_a_bug_shows_its_traceback_and_says_so(self) -> None:
        def start() -> None:
            raise RuntimeError("boom")

        code, text = self.run_failing(start)
        self.assertEqual(code, 70)
        self.assertIn("Traceback (most recent call last)", text)
        self.assertIn("RuntimeError: boom", text)
        self.assertTrue(text.endswith("failed because of a bug (not a configuration problem); please report it with "
                                      "the traceback above\n"))

    def test_a_bug_while_building_the_service(self) -> None:
        from connproxy import twistd
        from connproxy.config import embedded_proxy_config

        def build(config: Any, reactor: Any) -> Any:
            raise KeyError("oops")

        options = twistd.ConfigOptions()
        options.parseOptions([])
        err = io.StringIO()
        with mock.patch.object(sys, "__stderr__", err), self.assertRaises(SystemExit) as caught:
            twistd.make_service(options, lambda path, check_ports: embedded_proxy_config(), build)
        self.assertEqual(caught.exception.code, 70)
        self.assertIn("KeyError: 'oops'", err.getvalue())
        self.assertIn("building the service failed because of a bug", err.getvalue())
