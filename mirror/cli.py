"""Command line: `mirror serve` and the operator commands.

argv -> load_config -> logging -> run the app (`serve`), or call into
`mirror.ops` / `mirror.warm` and print the result: a table, or JSON with
`--json`. Exit status 2 means the configuration or the command line is
wrong; nothing was served or changed. Errors are one line on stderr, or
with `--json` one JSON object on stdout (`report_error`), a command line
that does not parse included.

Images and repositories are named as for `docker pull`: bare names are
docker.io's (`alpine` is `library/alpine`), others carry their registry
(`ghcr.io/owner/app:1`, `registry.corp:5000/team/app`).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import signal
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from mirror import __version__
from mirror.config import (
    Config,
    ConfigError,
    load_config,
    parse_duration,
    parse_url,
)
from mirror.tls import TlsError

log = logging.getLogger("mirror")


class CommandLineError(Exception):
    """The command line does not parse; `usage` is the command's usage text
    and `prog` its name (`mirror purge`)."""

    def __init__(self, message: str, usage: str, prog: str) -> None:
        super().__init__(message)
        self.message, self.usage, self.prog = message, usage, prog


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors main() reports, as text or as JSON,
    rather than printing them and exiting itself. Subcommands' parsers are
    of this class too (argparse makes them of the parent's class)."""

    def error(self, message: str) -> NoReturn:
        raise CommandLineError(message, self.format_usage(), self.prog)


def build_parser() -> argparse.ArgumentParser:
    """Raises CommandLineError from parse_args() for a bad command line."""
    parser = _Parser(
        prog="mirror",
        description="Pull-through caching mirror for Docker Hub and other registries.",
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
    add_operator_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `mirror ARGV...`; returns the exit status.

    With `--json`, an error is one JSON object on stdout (`report_error`),
    and nothing goes to stderr; without it, one line on stderr.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    # Before parsing, because a command line that does not parse is
    # reported as JSON too when it asks for JSON.
    as_json = "--json" in (argv[: argv.index("--")] if "--" in argv else argv)
    try:
        args = build_parser().parse_args(argv)
    except CommandLineError as exc:
        if not as_json:
            sys.stderr.write(exc.usage)
        return report_error(
            "usage", exc.message, 2, as_json=as_json, prefix=f"{exc.prog}: error"
        )
    as_json = bool(getattr(args, "json", False))
    try:
        config = load_config(args.config, os.environ)
    except ConfigError as exc:
        return report_error(
            "config",
            str(exc),
            2,
            as_json=as_json,
            key=exc.key,
            suggestion=exc.suggestion,
        )
    if args.command == "serve":
        setup_logging(config)
        return serve(config, args.config)
    return run_operator_command(args, config)


def setup_logging(config: Config) -> None:
    """`mirror serve`'s log on stderr, as log.format says (text or json;
    mirror/logformat.py). log.level applies to mirror's own loggers;
    libraries stay at INFO (at DEBUG, aiosqlite would log every SQL
    statement)."""
    from mirror.logformat import formatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(config.log.format))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    logging.getLogger("mirror").setLevel(config.log.level.upper())


def serve(config: Config, config_path: Path | None) -> int:
    # Imported here so the CLI's error paths stay fast and dependency-light.
    from mirror.app import RELOAD, run

    # A reload that arrives during start-up (before the handler is
    # installed) must not kill us, which is SIGHUP's default action.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        config.cache.dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _fatal(
            config,
            f"cannot create cache.dir {config.cache.dir}: {exc.strerror} "
            "(set cache.dir or MIRROR_CACHE_DIR)",
        )
        return 2
    # "listening" is logged by the listener, once every socket is bound.
    try:
        asyncio.run(
            run(
                config,
                on_reload=lambda app: reload_config(app[RELOAD], config_path),
            )
        )
    except OSError as exc:
        _fatal(config, str(exc.strerror))
        return 1
    except TlsError as exc:  # the files changed since the config was checked
        _fatal(config, f"server.tls_cert: {exc}")
        return 1
    return 0


def _fatal(config: Config, message: str) -> None:
    """Why `mirror serve` stops: `mirror: ...` on stderr, or with
    log.format = "json" an error line like every other, for the shipper."""
    if config.log.format == "json":
        log.error("%s", message)
    else:
        print(f"mirror: {message}", file=sys.stderr)


def reload_config(apply: Callable[[Config], list[str]], path: Path | None) -> None:
    """SIGHUP: re-read the configuration and apply what can change live.

    A configuration that does not load is reported and ignored: the daemon
    keeps running on the old one.
    """
    try:
        # The certificates are the TLS reload's to check and report.
        config = load_config(path, os.environ, load_certificates=False)
    except ConfigError as exc:
        log.error("reload failed, keeping the running configuration: %s", exc)
        return
    # apply() logs each changed key, old and new value (see mirror.app).
    needs_restart = apply(config)
    # WARNING, like the changes: log.level = warning must still show them.
    where = path or "the environment"
    if needs_restart:
        log.warning(
            "configuration reloaded from %s; changed, but takes effect only "
            "after a restart: %s",
            where,
            ", ".join(needs_restart),
        )
    else:
        log.warning("configuration reloaded from %s", where)


# --- operator commands: status, ls, purge, gc, verify, warm ----------------------


def add_operator_commands(commands: argparse._SubParsersAction[Any]) -> None:
    config_opt = argparse.ArgumentParser(add_help=False)
    config_opt.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="the daemon's TOML configuration (MIRROR_* variables apply too)",
    )
    config_opt.add_argument(
        "--json", action="store_true", help="print JSON for scripts, not a table"
    )
    cache_opts = argparse.ArgumentParser(add_help=False, parents=[config_opt])
    cache_opts.add_argument(
        "--cache-dir",
        type=Path,
        metavar="DIR",
        help="the cache directory (instead of cache.dir from the configuration)",
    )
    commands.add_parser(
        "status",
        parents=[cache_opts],
        help="cache size and budget, counts (per registry), access range, free disk",
    )
    ls = commands.add_parser(
        "ls", parents=[cache_opts], help="cached repositories, or one's tags"
    )
    ls.add_argument(
        "repository", nargs="?", metavar="REPO", help="e.g. alpine, ghcr.io/owner/app"
    )
    purge = commands.add_parser(
        "purge",
        parents=[cache_opts],
        help="remove a repository, a tag, or what was not used for a while",
        description="Remove REPO (its tags and manifests) or REPO:TAG, or "
        "everything last used longer ago than --older-than; then the "
        "manifests and blobs nothing else needs. REPO is docker.io's unless "
        "it names a registry (ghcr.io/owner/app:1), and only that registry's "
        "repository goes. See docs/operations.md.",
    )
    purge.add_argument("image", nargs="?", metavar="REPO[:TAG]")
    purge.add_argument(
        "--older-than",
        metavar="DURATION",
        help="remove what was last used longer ago than this (e.g. 30d)",
    )
    purge.add_argument(
        "--dry-run", action="store_true", help="show what would go; change nothing"
    )
    commands.add_parser(
        "gc",
        parents=[cache_opts],
        help="run an eviction pass now (cache.max_size, min_free, low_watermark)",
    )
    commands.add_parser(
        "verify",
        parents=[cache_opts],
        help="re-hash every blob, remove the bad ones (exit status 1 if any)",
    )
    warm = commands.add_parser(
        "warm",
        parents=[config_opt],
        help="pre-pull images into a running mirror",
        description="Pull images through a running mirror so that it caches "
        "them: manifests (every platform of an index, or --platform), config "
        "and layers. Exit status 1 if any image failed.",
    )
    warm.add_argument(
        "images", nargs="*", metavar="IMAGE", help="e.g. alpine:3, ghcr.io/owner/app:1"
    )
    warm.add_argument(
        "--file",
        type=Path,
        metavar="LIST",
        help="read images from LIST, one per line (# starts a comment)",
    )
    warm.add_argument(
        "--mirror",
        metavar="URL",
        help="the mirror to warm (default: server.listen, on this host)",
    )
    warm.add_argument(
        "--platform",
        metavar="OS/ARCH[/VARIANT]",
        help="only this platform of multi-platform images (e.g. linux/arm64)",
    )
    warm.add_argument(
        "--concurrency",
        type=_positive_int,
        default=3,
        metavar="N",
        help="blobs fetched at once (default 3)",
    )


def _positive_int(text: str) -> int:
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise argparse.ArgumentTypeError(f"{text!r} is not a whole number > 0")


def run_operator_command(args: argparse.Namespace, config: Config) -> int:
    """Run one of the commands above; returns the exit status."""
    from mirror import ops

    level = max(logging.WARNING, logging.getLevelName(config.log.level.upper()))
    logging.basicConfig(
        level=level, format="mirror: %(levelname)s: %(message)s", stream=sys.stderr
    )
    cache_dir = getattr(args, "cache_dir", None)
    if cache_dir is not None:
        config = dataclasses.replace(
            config, cache=dataclasses.replace(config.cache, dir=cache_dir)
        )
    as_json = bool(args.json)
    try:
        return _COMMANDS[args.command](args, config)
    except ops.OpsError as exc:
        return report_error(exc.kind, str(exc), exc.exit_status, as_json=as_json)
    except sqlite3.Error as exc:
        message = f"{config.cache.dir}: database: {exc}"
        return report_error("database", message, 1, as_json=as_json)
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        message = f"{where}{exc.strerror or exc}"
        return report_error("runtime", message, 1, as_json=as_json)
    except KeyboardInterrupt:
        # A purge rolls back; blobs already taken out of the store are gone.
        return report_error("interrupted", "interrupted", 130, as_json=as_json)


def report_error(
    kind: str,
    message: str,
    status: int,
    *,
    as_json: bool,
    key: str | None = None,
    suggestion: str | None = None,
    prefix: str = "mirror",
) -> int:
    """Report an error the operator can act on; returns `status`.

    As text: `mirror: <message>` on stderr. As JSON, on stdout, for
    scripts: `{"error": {"kind", "message", "key", "suggestion"}}`, where
    `kind` is one of config, usage, no_cache, not_found, database, runtime
    or interrupted, and `key` and `suggestion` are null unless the error is
    about one configuration key or variable (docs/operations.md).
    """
    if as_json:
        error = {"kind": kind, "message": message, "key": key, "suggestion": suggestion}
        print(json.dumps({"error": error}, indent=2), flush=True)
    else:
        print(f"{prefix}: {message}", file=sys.stderr)
    return status


def _print(args: argparse.Namespace, value: object, text: str) -> None:
    from mirror.ops import to_json

    print(to_json(value) if args.json else text)


def _status(args: argparse.Namespace, config: Config) -> int:
    from mirror import ops

    result = asyncio.run(ops.status(config.cache))
    _print(args, result, ops.render_status(result, time.time()))
    return 0


def _ls(args: argparse.Namespace, config: Config) -> int:
    from mirror import ops

    if args.repository is None:
        repos = asyncio.run(ops.list_repositories(config.cache))
        _print(
            args, {"repositories": repos}, ops.render_repositories(repos, time.time())
        )
        return 0
    ref = ops.parse_image_ref(args.repository)
    if ref.tag is not None or ref.digest is not None:
        raise ops.UsageError(f"ls takes a repository name, not {args.repository!r}")
    tags = asyncio.run(ops.list_tags(config.cache, ref.registry, ref.repository))
    _print(
        args,
        {"registry": ref.registry, "repository": ref.repository, "tags": tags},
        ops.render_tags(ref.name, tags, time.time()),
    )
    return 0


def _purge(args: argparse.Namespace, config: Config) -> int:
    from mirror import ops

    older_than = None
    if args.older_than is not None:
        try:
            older_than = parse_duration(args.older_than)
        except ValueError as exc:
            raise ops.UsageError(f"--older-than: {exc}") from None
    image = None if args.image is None else ops.parse_image_ref(args.image)
    report = asyncio.run(
        ops.purge(
            config.cache, image=image, older_than=older_than, dry_run=args.dry_run
        )
    )
    _print(args, report.as_json(), ops.render_purge(report))
    return 0


def _gc(args: argparse.Namespace, config: Config) -> int:
    from mirror import ops

    report = asyncio.run(ops.gc(config.cache))
    _print(args, report, ops.render_gc(report))
    return 0


def _verify(args: argparse.Namespace, config: Config) -> int:
    from mirror import ops

    progress = ops.Progress(sys.stderr)
    try:
        report = asyncio.run(ops.verify(config.cache, progress.verify_callback()))
    finally:
        progress.finish()
    _print(args, report, ops.render_verify(report))
    return 1 if report.removed else 0


def _warm(args: argparse.Namespace, config: Config) -> int:
    from mirror import ops, warm

    images = list(args.images)
    if args.file is not None:
        images += warm.read_image_list(args.file)
    if not images:
        raise ops.UsageError("warm: give images, or --file LIST")
    platform = None if args.platform is None else warm.parse_platform(args.platform)
    url = warm.default_mirror_url(config.server.listen)
    if args.mirror is not None:
        try:
            url = parse_url(args.mirror)
        except ValueError as exc:
            raise ops.UsageError(f"--mirror: {exc}") from None
    # A few updates a second on a terminal; none into a pipe or a log.
    progress = ops.Progress(sys.stderr, tty_interval=0.25)
    show = progress.transfer_callback()

    def on_bytes(result: warm.WarmResult, total: int | None) -> None:
        if progress.tty:
            show(result.name, result.bytes, total)

    def on_result(result: warm.WarmResult) -> None:
        progress.finish()
        if args.json:
            if not progress.tty:
                print(warm.render_result(result), file=sys.stderr)
        else:
            print(warm.render_result(result), flush=True)

    started = time.monotonic()
    results = asyncio.run(
        warm.warm(
            url,
            images,
            platform=platform,
            concurrency=args.concurrency,
            on_result=on_result,
            on_bytes=on_bytes,
        )
    )
    summary = warm.render_summary(results, time.monotonic() - started)
    _print(args, {"mirror": url, "images": results}, summary)
    return 0 if all(r.ok for r in results) else 1


_COMMANDS: dict[str, Callable[[argparse.Namespace, Config], int]] = {
    "status": _status,
    "ls": _ls,
    "purge": _purge,
    "gc": _gc,
    "verify": _verify,
    "warm": _warm,
}
