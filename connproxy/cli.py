"""The ``connproxy`` console script: certificates, test tokens, the demo and configuration checks.

Sub-commands (see ``contract.md``)::

    connproxy certs init --dir DIR --host NAME [--host NAME ...]
    connproxy certs connector --dir DIR --subaccount ID [--location LOC] --out PREFIX
    connproxy token --dir DIR --subaccount ID --client-id CID [--ttl S]
    connproxy demo [--state-dir DIR]
    connproxy config check (--proxy FILE | --connector FILE) [--skip-ports]
    connproxy probe socks [--location LOC] [--token JWT] HOST:PORT
    connproxy probe http [--location LOC] [--token JWT] URL

:func:`main` returns the exit status: 0 on success, 2 on a usage error or a failure it can explain (the
message goes to stderr, without a traceback). ``token`` and ``demo`` are implemented in
:mod:`connproxy.pki.tokens` and :mod:`connproxy.demo`, imported only when used.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

from connproxy import __version__

__all__ = ["EXIT_BUG", "EXIT_ERROR", "EXIT_OK", "build_parser", "main"]

EXIT_OK = 0
EXIT_ERROR = 2
#: A bug (``EX_SOFTWARE``): a traceback and a line saying so.
EXIT_BUG = 70

_Handler = Callable[[argparse.Namespace], int]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _fail(command: str, message: str) -> int:
    print(f"connproxy {command}: {message}", file=sys.stderr)
    return EXIT_ERROR


def _certs_init(args: argparse.Namespace) -> int:
    from connproxy.pki import certs

    directory = Path(args.dir)
    had_ca = (directory / certs.CA_CERT_FILE).exists() and (directory / certs.CA_KEY_FILE).exists()
    try:
        files = certs.init_dir(directory, args.host)
    except certs.PKIError as exc:
        return _fail("certs init", str(exc))
    if had_ca:
        print(f"kept the existing CA {files.ca_cert}", file=sys.stderr)
        written = [files.proxy_cert, files.proxy_key]
    else:
        written = [files.ca_cert, files.ca_key, files.proxy_cert, files.proxy_key]
    for path in written:
        print(path)
    return EXIT_OK


def _certs_connector(args: argparse.Namespace) -> int:
    from connproxy.pki import certs

    try:
        crt, key = certs.issue_connector(args.dir, args.subaccount, args.location, args.out)
    except certs.PKIError as exc:
        return _fail("certs connector", str(exc))
    print(crt)
    print(key)
    return EXIT_OK


def _config_check(args: argparse.Namespace) -> int:
    """Everything start-up checks (keys, values, cross-field rules, the files named), plus free listening ports
    unless ``--skip-ports``; every problem one line on stderr."""
    from connproxy import config

    check_ports = not args.skip_ports
    try:
        if args.proxy is not None:
            config.verify_proxy_config_file(args.proxy, check_ports=check_ports)
        else:
            config.verify_connector_config_file(args.connector, check_ports=check_ports)
    except config.ConfigError as exc:
        for line in exc.lines:
            print(line, file=sys.stderr)
        return EXIT_ERROR
    except Exception:
        traceback.print_exc(file=sys.stderr)
        print("connproxy config check: failed because of a bug (not a configuration problem); please report it with "
              "the traceback above", file=sys.stderr)
        return EXIT_BUG
    print("ok")
    return EXIT_OK


def _delegate(module_name: str, function_name: str, command: str) -> _Handler:
    """A handler that imports ``module_name`` only when the sub-command runs."""

    def run(args: argparse.Namespace) -> int:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            return _fail(command, "not available yet")
        function = getattr(module, function_name, None)
        if function is None:
            return _fail(command, f"not available yet ({module_name}.{function_name} is missing)")
        return int(cast(_Handler, function)(args))

    return run


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; each leaf sub-command stores its handler as ``args.handler``."""
    parser = argparse.ArgumentParser(
        prog="connproxy", description="connproxy tools: certificates, test tokens, the demo, config checks."
    )
    parser.add_argument("--version", action="version", version=f"connproxy {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    certs_parser = commands.add_parser("certs", help="create a private CA and certificates")
    certs_commands = certs_parser.add_subparsers(dest="certs_command", metavar="COMMAND")
    init = certs_commands.add_parser(
        "init",
        help="create DIR/ca.{crt,key} (kept if present) and DIR/proxy.{crt,key} for the given names",
    )
    init.add_argument("--dir", required=True, metavar="DIR", help="the PKI directory (created if needed)")
    init.add_argument(
        "--host",
        required=True,
        action="append",
        metavar="NAME",
        help="a DNS name or IP address for the proxy certificate (repeatable; the first is the CN)",
    )
    init.set_defaults(handler=_certs_init)
    connector = certs_commands.add_parser(
        "connector", help="issue a connector client certificate PREFIX.{crt,key} signed by DIR's CA"
    )
    connector.add_argument("--dir", required=True, metavar="DIR", help="the PKI directory holding the CA")
    connector.add_argument("--subaccount", required=True, metavar="ID", help="the subaccount to bind")
    connector.add_argument(
        "--location", metavar="LOC", help='the location to bind ("" = the default location; omit for none)'
    )
    connector.add_argument("--out", required=True, metavar="PREFIX", help="write PREFIX.crt and PREFIX.key")
    connector.set_defaults(handler=_certs_connector)

    token = commands.add_parser("token", help="print a test JWT signed by DIR/token.key")
    token.add_argument("--dir", required=True, metavar="DIR", help="holds token.key and token_keys.json")
    token.add_argument("--subaccount", required=True, metavar="ID", help="zid and ext_attr.subaccountid")
    token.add_argument("--client-id", required=True, metavar="CID", help="client_id and cid")
    token.add_argument(
        "--ttl", type=_positive_int, default=3600, metavar="S", help="lifetime in seconds (default 3600)"
    )
    token.set_defaults(handler=_delegate("connproxy.pki.tokens", "main_token", "token"))

    demo = commands.add_parser("demo", help="run proxy, connector and a backend in one process on loopback")
    demo.add_argument(
        "--state-dir", metavar="DIR", help="state folder for the development PKI (default: the usual one)"
    )
    demo.set_defaults(handler=_delegate("connproxy.demo", "main_demo", "demo"))

    config_parser = commands.add_parser("config", help="validate configuration files")
    config_commands = config_parser.add_subparsers(dest="config_command", metavar="COMMAND")
    check = config_commands.add_parser(
        "check",
        help='validate a file the way start-up would (keys, values, the files it names, free ports); print "ok" '
        "or one line per problem",
    )
    which = check.add_mutually_exclusive_group(required=True)
    which.add_argument("--proxy", metavar="FILE", help="a proxy configuration file")
    which.add_argument("--connector", metavar="FILE", help="a connector configuration file")
    check.add_argument(
        "--skip-ports", action="store_true",
        help="do not try to bind the listening ports (for checking the file of a process that is running)",
    )
    check.set_defaults(handler=_config_check)

    from connproxy.probe import add_parser as add_probe_parser

    add_probe_parser(commands)

    # A group without a leaf command prints its own help.
    for group in (parser, certs_parser, config_parser):
        group.set_defaults(handler=None, help_parser=group)
    for leaf in (init, connector, token, demo, check):
        leaf.set_defaults(help_parser=leaf)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``connproxy`` command line with ``argv`` (default ``sys.argv[1:]``); return the exit status.

    Never raises :class:`SystemExit` for usage errors or ``--help``/``--version`` (it returns the status
    argparse chose instead), so it can be called from tests.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    handler: _Handler | None = args.handler
    if handler is None:
        cast(argparse.ArgumentParser, args.help_parser).print_help(sys.stderr)
        return EXIT_ERROR
    return handler(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
