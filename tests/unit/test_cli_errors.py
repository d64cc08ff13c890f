"""How `mirror` reports errors: one line on stderr, or with `--json` one JSON
object on stdout, through the real entry point `mirror.cli.main`, and the
progress line `mirror warm` draws on a terminal."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest

from mirror import ops
from mirror.cli import main


@pytest.fixture(autouse=True)
def _no_mirror_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """main() reads os.environ: keep the runner's MIRROR_* out of it."""
    for name in list(os.environ):
        if name.startswith("MIRROR_"):
            monkeypatch.delenv(name)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def json_error(
    capsys: pytest.CaptureFixture[str], *argv: str
) -> tuple[int, dict[str, Any]]:
    """Run with --json; the error must be the only thing printed, on stdout."""
    status, out, err = run(capsys, *argv)
    assert err == ""
    document = json.loads(out)
    assert list(document) == ["error"]
    error = document["error"]
    assert set(error) == {"kind", "message", "key", "suggestion"}
    assert error["message"]
    assert "\n" not in error["message"]
    return status, error


def write_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "mirror.toml"
    path.write_text(text)
    return str(path)


# --- configuration errors ---------------------------------------------------------


def test_a_bad_size_as_json_names_key_and_fix(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = write_config(tmp_path, '[cache]\nmax_size = "50gib"\n')
    status, error = json_error(capsys, "status", "--config", config, "--json")
    assert status == 2
    assert error["kind"] == "config"
    assert error["key"] == "cache.max_size"
    assert error["suggestion"] == "50GiB"
    assert error["message"].startswith("cache.max_size: '50gib' is not a size")


def test_a_bad_size_as_text_is_one_line_on_stderr(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = write_config(tmp_path, '[cache]\nmax_size = "50GB "\n')
    status, out, err = run(capsys, "status", "--config", config)
    assert (status, out) == (2, "")
    assert err.startswith("mirror: cache.max_size: '50GB ' is not a size (a trailing")
    assert "did you mean '50GB'?" in err
    assert err.count("\n") == 1


def test_a_zero_budget_is_refused_as_json(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MIRROR_CACHE_MAX_SIZE", "0")
    status, error = json_error(capsys, "gc", "--json")
    assert (status, error["kind"], error["key"]) == (2, "config", "cache.max_size")
    assert "no room for any blob" in error["message"]
    assert error["message"].endswith("(from MIRROR_CACHE_MAX_SIZE)")


def test_an_unknown_variable_gets_a_suggestion_as_json_and_text(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MIRROR_CACHE_MAXSIZE", "1GiB")
    status, error = json_error(capsys, "status", "--json")
    assert status == 2
    assert error == {
        "kind": "config",
        "message": "unknown environment variable MIRROR_CACHE_MAXSIZE "
        "(did you mean MIRROR_CACHE_MAX_SIZE?)",
        "key": "MIRROR_CACHE_MAXSIZE",
        "suggestion": "MIRROR_CACHE_MAX_SIZE",
    }
    status, out, err = run(capsys, "status")
    assert (status, out) == (2, "")
    assert err == (
        "mirror: unknown environment variable MIRROR_CACHE_MAXSIZE "
        "(did you mean MIRROR_CACHE_MAX_SIZE?)\n"
    )


def test_an_unknown_key_as_json(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = write_config(tmp_path, '[cache]\nmaxsize = "1GiB"\n')
    status, error = json_error(capsys, "ls", "--json", "--config", config)
    assert (status, error["kind"]) == (2, "config")
    assert (error["key"], error["suggestion"]) == ("cache.maxsize", "cache.max_size")


def test_serve_reports_a_config_error_as_text(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = write_config(tmp_path, "[cahce]\n")
    status, out, err = run(capsys, "serve", "--config", config)
    assert (status, out) == (2, "")
    assert err == "mirror: unknown section [cahce] (did you mean [cache]?)\n"


# --- command-line errors ----------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (("status", "--bogus", "--json"), "unrecognized arguments: --bogus"),
        (("warm", "alpine", "--concurrency", "0", "--json"), "--concurrency"),
        (("--json",), "required: command"),
        (("nosuch", "--json"), "invalid choice: 'nosuch'"),
    ],
)
def test_a_command_line_that_does_not_parse_is_json_when_asked(
    capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], words: str
) -> None:
    status, error = json_error(capsys, *argv)
    assert (status, error["kind"], error["key"]) == (2, "usage", None)
    assert words in error["message"]


def test_a_command_line_that_does_not_parse_is_usage_text_otherwise(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # As argparse prints it: the usage, then `prog: error: message`.
    status, out, err = run(capsys, "status", "--bogus")
    assert (status, out) == (2, "")
    assert err.startswith("usage: mirror ")
    assert err.endswith("\nmirror: error: unrecognized arguments: --bogus\n")
    status, out, err = run(capsys, "warm", "--concurrency", "x")
    assert (status, out) == (2, "")
    assert err.startswith("usage: mirror warm ")
    assert "\nmirror warm: error: argument --concurrency: " in err
    # After `--` it is an argument, not a request for JSON.
    status, out, err = run(capsys, "ls", "--", "--json", "x")
    assert (status, out) == (2, "")
    assert "error: unrecognized arguments" in err


def test_a_bad_option_value_is_a_usage_error_as_json(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    argv = ("purge", "--older-than", "30x", "--cache-dir", str(tmp_path), "--json")
    status, error = json_error(capsys, *argv)
    assert (status, error["kind"]) == (2, "usage")
    assert error["message"].startswith("--older-than: '30x' is not a duration")
    status, error = json_error(capsys, "warm", "--json")
    assert (status, error["kind"]) == (2, "usage")
    assert error["message"] == "warm: give images, or --file LIST"


# --- runtime errors ---------------------------------------------------------------


def test_no_cache_is_its_own_kind(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = tmp_path / "nothing"
    for command in ("status", "ls", "gc", "verify", "purge"):
        argv = [command, "--cache-dir", str(missing), "--json"]
        if command == "purge":
            argv += ["--older-than", "1d"]
        status, error = json_error(capsys, *argv)
        assert (status, error["kind"]) == (2, "no_cache"), command
        assert error["message"].startswith(f"no cache in {missing} "), command
    assert not missing.exists()


def test_a_database_that_is_not_one_is_a_runtime_failure(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "mirror.db").write_bytes(b"not a database at all" * 100)
    status, error = json_error(capsys, "status", "--cache-dir", str(tmp_path), "--json")
    assert (status, error["kind"]) == (1, "database")
    assert error["message"].startswith(f"{tmp_path}: database: ")
    status, out, err = run(capsys, "status", "--cache-dir", str(tmp_path))
    assert (status, out) == (1, "")
    assert err.startswith(f"mirror: {tmp_path}: database: ")


def test_a_failing_file_system_operation_is_reported_not_a_traceback(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "mirror.db").write_bytes(b"")  # an empty database: migrated
    (tmp_path / "tmp").write_text("a file where the tmp/ directory goes")
    status, error = json_error(capsys, "status", "--cache-dir", str(tmp_path), "--json")
    assert (status, error["kind"]) == (1, "runtime")
    assert error["message"] == f"{tmp_path / 'tmp'}: File exists"


# --- warm progress -----------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_transfer_progress_is_throttled_and_shows_the_end() -> None:
    stream, clock = io.StringIO(), Clock()
    progress = ops.Progress(stream, tty=True, tty_interval=0.25, clock=clock)
    update = progress.transfer_callback()
    update("library/alpine:3", 0, 3 * 1024**2)
    clock.now = 0.1
    update("library/alpine:3", 1024**2, 3 * 1024**2)  # too soon: skipped
    clock.now = 0.3
    update("library/alpine:3", 1024**2 + 512 * 1024, 3 * 1024**2)
    clock.now = 0.31
    update("library/alpine:3", 3 * 1024**2, 3 * 1024**2)  # the end: shown
    progress.finish()
    update("library/python:3", 10, None)  # a new image starts at once
    progress.finish()
    assert stream.getvalue() == (
        "\rlibrary/alpine:3 0 B / 3.0 MiB (0%)\x1b[K"
        "\rlibrary/alpine:3 1.5 MiB / 3.0 MiB (50%)\x1b[K"
        "\rlibrary/alpine:3 3.0 MiB / 3.0 MiB (100%)\x1b[K\n"
        "\rlibrary/python:3 10 B\x1b[K\n"
    )
