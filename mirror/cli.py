"""Command line: `mirror serve` and the operator commands.

argv -> load_config -> logging -> run the app (`serve`), or call into
`mirror.ops` / `mirror.warm` and print the result: a table, or JSON with
`--json`. Exit status 2 means the configuration or the command line is
wrong; nothing was served or changed.

Images and repositories are named as for `docker pull`: bare names are
docker.io's (`alpine` is `library/alpine`), others carry their registry
(`ghcr.io/owner/app:1`, `registry.corp:5000/team/app`).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args.config, os.environ)
    except ConfigError as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        setup_logging(config)
        return serve(config, args.config)
    return run_operator_command(args, config)


def setup_logging(config: Config) -> None:
    """log.level applies to mirror's own loggers; libraries stay at INFO
    (at DEBUG, aiosqlite would log every SQL statement)."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
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
        print(
            f"mirror: cannot create cache.dir {config.cache.dir}: {exc.strerror} "
            "(set cache.dir or MIRROR_CACHE_DIR)",
            file=sys.stderr,
        )
        return 2
    listen = config.server.listen
    log.info("mirror %s listening on %s", __version__, listen)
    try:
        asyncio.run(
            run(
                config,
                on_reload=lambda app: reload_config(app[RELOAD], config_path),
            )
        )
    except OSError as exc:
        print(f"mirror: {exc.strerror}", file=sys.stderr)
        return 1
    except TlsError as exc:  # the files changed since the config was checked
        print(f"mirror: server.tls_cert: {exc}", file=sys.stderr)
        return 1
    return 0


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
    needs_restart = apply(config)
    log.info("configuration reloaded from %s", path or "the environment")
    for key in needs_restart:
        log.warning("%s changed but takes effect only after a restart", key)


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
    try:
        return _COMMANDS[args.command](args, config)
    except ops.OpsError as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return exc.exit_status
    except sqlite3.Error as exc:
        print(f"mirror: {config.cache.dir}: database: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # A purge rolls back; blobs already taken out of the store are gone.
        print("mirror: interrupted", file=sys.stderr)
        return 130


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
    progress = ops.Progress(sys.stderr)

    def on_bytes(result: warm.WarmResult) -> None:
        if progress.tty:
            progress.show(f"warming {result.name}: {ops.human_size(result.bytes)}")

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
