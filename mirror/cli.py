"""Command line: `mirror serve` and friends.

argv -> load_config -> logging -> run the app. Exit status 2 means the
configuration or the command line is wrong; nothing was served.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from aiohttp import web

from mirror import __version__
from mirror.config import Config, ConfigError, load_config

log = logging.getLogger("mirror")

ACCESS_LOG_FORMAT = '%a "%r" %s %b %Tf "%{User-Agent}i"'


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mirror", description="Pull-through caching mirror for Docker Hub."
    )
    parser.add_argument("--version", action="version", version=f"mirror {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the mirror daemon")
    serve.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML configuration file (every key also has a MIRROR_* variable)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config, os.environ)
    except ConfigError as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return 2
    setup_logging(config)
    if args.command == "serve":
        return serve(config, args.config)
    return 2  # pragma: no cover - argparse rejects unknown commands


def setup_logging(config: Config) -> None:
    logging.basicConfig(
        level=config.log.level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def serve(config: Config, config_path: Path | None) -> int:
    # Imported here so the CLI's error paths stay fast and dependency-light.
    from mirror.app import RELOAD, create_app

    try:
        config.cache.dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(
            f"mirror: cannot create cache.dir {config.cache.dir}: {exc.strerror} "
            "(set cache.dir or MIRROR_CACHE_DIR)",
            file=sys.stderr,
        )
        return 2
    listen = config.server.listen
    log.info("mirror %s listening on %s", __version__, listen)
    app = create_app(config)

    async def on_startup(app: web.Application) -> None:
        asyncio.get_running_loop().add_signal_handler(
            signal.SIGHUP, reload_config, app[RELOAD], config_path
        )

    app.on_startup.append(on_startup)
    try:
        web.run_app(
            app,
            host=listen.host,
            port=listen.port,
            access_log=logging.getLogger("mirror.access")
            if config.log.access_log
            else None,
            access_log_format=ACCESS_LOG_FORMAT,
            print=None,
            handle_signals=True,
        )
    except OSError as exc:
        print(f"mirror: cannot listen on {listen}: {exc.strerror}", file=sys.stderr)
        return 1
    return 0


def reload_config(apply: Callable[[Config], list[str]], path: Path | None) -> None:
    """SIGHUP: re-read the configuration and apply what can change live.

    A configuration that does not load is reported and ignored: the daemon
    keeps running on the old one.
    """
    try:
        config = load_config(path, os.environ)
    except ConfigError as exc:
        log.error("reload failed, keeping the running configuration: %s", exc)
        return
    needs_restart = apply(config)
    log.info("configuration reloaded from %s", path or "the environment")
    for key in needs_restart:
        log.warning("%s changed but takes effect only after a restart", key)
