"""`llm-gateway`: serve, check-config, simulate. Wiring only."""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import logging
import os
import socket
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn

from gateway import heap
from gateway.app import SIMULATOR_PREFIX, GatewayApp, create_app
from gateway.config import LOG_FORMATS, ConfigError, ServerConfig, describe_config, load_config
from gateway.demo import demo_config, demo_models
from gateway.http_server import HeaderTimeoutProtocol
from gateway.observability import logs, metrics
from gateway.shared.policy import per_worker_line
from gateway.simulator import create_simulator_app
from gateway.supervisor import Workers

DEFAULT_CONFIG = Path("gateway.yaml")
# How `serve` hands its choice to the app factory, which runs in every worker process.
_CONFIG_ENV = "LLM_GATEWAY_SERVE_CONFIG"
_DEMO_URL_ENV = "LLM_GATEWAY_SERVE_DEMO_URL"
_LOG_LEVEL_ENV = "LLM_GATEWAY_SERVE_LOG_LEVEL"
_LOG_FORMAT_ENV = "LLM_GATEWAY_SERVE_LOG_FORMAT"
_WORKERS_ENV = "LLM_GATEWAY_SERVE_WORKERS"
_WATCH_ENV = "LLM_GATEWAY_SERVE_WATCH_CONFIG"
# After the gateway's own drain (server.shutdown_grace_s, gateway.lifecycle), what uvicorn may
# still wait for: nothing is in flight by then.
_GRACEFUL_SHUTDOWN_S = 5
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
_DEMO_BODY = '{"model": "demo", "messages": [{"role": "user", "content": "hi"}]}'


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = {"serve": _serve, "check-config": _check_config, "simulate": _simulate}
    return handler[args.command](args)


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default, once: not for flags, nor where the help already says it (an
    option whose default is worked out at start-up, kept as None here)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.nargs == 0 or "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-gateway",
        description="A resilient OpenAI-compatible LLM gateway.",
        formatter_class=_DefaultsHelp,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gateway", formatter_class=_DefaultsHelp)
    serve.add_argument(
        "--config",
        type=Path,
        help=f"YAML config (default: ./{DEFAULT_CONFIG} if present, else the built-in demo)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=_port, default=8080, help="port to listen on")
    serve.add_argument("--workers", type=_positive, default=1, help="worker processes")
    serve.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="log level")
    serve.add_argument(
        "--log-format", choices=LOG_FORMATS, help="text or json (default: server.log_format)"
    )
    serve.add_argument(
        "--access-log", action="store_true", help="also uvicorn's own access line per request"
    )
    serve.add_argument(
        "--watch-config",
        action="store_true",
        help="reload the config when its file changes (SIGHUP always reloads it)",
    )
    check = commands.add_parser("check-config", help="validate a config and print its routes")
    check.add_argument("file", type=Path, help="the YAML config")
    simulate = commands.add_parser(
        "simulate",
        help="run the fault-injecting upstream simulator",
        formatter_class=_DefaultsHelp,
    )
    simulate.add_argument("--host", default="127.0.0.1", help="address to listen on")
    simulate.add_argument("--port", type=_port, default=8000, help="port to listen on")
    simulate.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="log level")
    return parser


def _positive(text: str) -> int:
    if not text.isascii() or not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (got {text!r})")
    return int(text)


def _port(text: str) -> int:
    if not text.isascii() or not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"must be a port from 1 to 65535 (got {text!r})")
    return int(text)


def _version() -> str:
    try:
        return importlib.metadata.version("llm-gateway")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _port_free(host: str, port: int) -> bool:
    """Whether `serve` can listen there: said in one line before any worker starts."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as error:
        print(f"llm-gateway: cannot listen on {host}:{port}: {error.strerror}", file=sys.stderr)  # noqa: T201
        return False
    return True


def _serve(args: argparse.Namespace) -> int:
    path: Path | None = args.config
    if path is None and DEFAULT_CONFIG.exists():
        path = DEFAULT_CONFIG
    log_format = args.log_format
    server = ServerConfig()  # the demo's
    if path is not None:
        try:
            config = load_config(path)  # fail here, once, with every error, before any worker
        except ConfigError as error:
            _print_errors(path, error)
            return 1
        os.environ[_CONFIG_ENV] = str(path.absolute())  # not resolved: a ConfigMap swaps links
        log_format = log_format or config.server.log_format
        server = config.server
    else:
        host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        base = f"http://{host}:{args.port}"
        os.environ[_DEMO_URL_ENV] = f"{base}{SIMULATOR_PREFIX}/v1"
        _print_demo_banner(base)
    if not _port_free(args.host, args.port):
        return 1
    os.environ[_LOG_LEVEL_ENV] = args.log_level
    os.environ[_LOG_FORMAT_ENV] = log_format = log_format or "text"
    os.environ[_WORKERS_ENV] = str(args.workers)
    os.environ[_WATCH_ENV] = "1" if args.watch_config else ""
    logs.configure(args.log_level, log_format)
    if path is not None and (line := per_worker_line(config, args.workers)):
        logging.getLogger("gateway").info("%s", line)  # said once, not by every worker
    if path is None and args.watch_config:
        logging.getLogger("gateway").warning("--watch-config: no config file to watch (demo)")
    loop, http = _server_stack()
    with _metrics_shared_by(args.workers):
        settings: dict[str, Any] = dict(
            host=args.host,
            port=args.port,
            workers=args.workers,
            log_level=args.log_level,
            log_config=None,  # ours, in the chosen format
            access_log=args.access_log,  # the gateway logs each request once, itself
            proxy_headers=False,  # nothing here reads the client's address: skip the layer
            loop=loop,
            http=HeaderTimeoutProtocol if http == "httptools" else http,
            timeout_keep_alive=max(1, round(server.keepalive_s)),
            timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_S,
        )
        if args.workers > 1:  # SIGHUP reloads the workers rather than replacing them
            supervised = uvicorn.Config("gateway.cli:app_factory", factory=True, **settings)
            Workers(supervised, sockets=[supervised.bind_socket()]).run()
        else:
            uvicorn.run("gateway.cli:app_factory", factory=True, **settings)
    return 0


@contextmanager
def _metrics_shared_by(workers: int) -> Iterator[None]:
    """With several workers, each records into files of one directory that every scrape
    adds up (prometheus_client's multiprocess mode); the directory lives as long as serve."""
    if workers < 2 or os.environ.get(metrics.MULTIPROC_ENV):
        yield
        return
    with tempfile.TemporaryDirectory(prefix="llm-gateway-metrics-") as directory:
        os.environ[metrics.MULTIPROC_ENV] = directory
        try:
            yield
        finally:
            del os.environ[metrics.MULTIPROC_ENV]


def _server_stack() -> tuple[str, str]:
    """The fastest event loop and HTTP parser installed (both are by default), said aloud."""
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    logging.getLogger("gateway").info("serving with event loop %s and HTTP parser %s", loop, http)
    return loop, http


def app_factory() -> GatewayApp:
    """Build the app in a server process from what `serve` decided."""
    level = os.environ.get(_LOG_LEVEL_ENV, "info")
    logs.configure(level, os.environ.get(_LOG_FORMAT_ENV, "text"))  # worker processes start bare
    path = os.environ.get(_CONFIG_ENV)
    if path is not None:
        config = load_config(path)
        HeaderTimeoutProtocol.header_timeout_s = config.server.header_timeout_s
        app = create_app(
            config,
            workers=int(os.environ.get(_WORKERS_ENV, "1")),
            config_path=Path(path),
            watch_config=bool(os.environ.get(_WATCH_ENV)),
        )
    else:
        app = create_app(demo_config(os.environ[_DEMO_URL_ENV]), with_simulator=True)
    heap.settle()  # what start-up built stays out of the collector's way
    return app


def _check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
    except ConfigError as error:
        _print_errors(args.file, error)
        return 1
    _print_output(describe_config(config))
    return 0


def _print_output(text: str) -> None:
    """Print a command's output. A reader that stopped early (`check-config ... | head`) is
    not an error: the rest is dropped, and stdout is pointed at /dev/null so that Python's
    flush at exit does not fail on the closed pipe again."""
    try:
        print(text, flush=True)  # noqa: T201 - the command's output
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _simulate(args: argparse.Namespace) -> int:
    logs.configure(args.log_level, "text")
    loop, http = _server_stack()
    uvicorn.run(
        create_simulator_app(),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        loop=loop,
        http=http,
    )
    return 0


def _print_errors(path: Path, error: ConfigError) -> None:
    print(f"{path}: {len(error.errors)} error(s)", file=sys.stderr)  # noqa: T201
    for line in error.errors:
        print(f"  {line}", file=sys.stderr)  # noqa: T201


def _print_demo_banner(base: str) -> None:
    models = ", ".join(demo_models())
    print(  # noqa: T201 - the first thing a new user reads
        f"No config given and no ./{DEFAULT_CONFIG}: serving the built-in demo.\n"
        f"Its upstream is the simulator at {base}{SIMULATOR_PREFIX}. Models: {models}.\n"
        f"Try:\n"
        f"  curl {base}/v1/chat/completions -H 'content-type: application/json' \\\n"
        f'    -d \'{{"model": "demo", "messages": [{{"role": "user", "content": "hi"}}]}}\'',
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
