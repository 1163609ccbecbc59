"""The `sandkasten` console script called in this process: the entry point the script runs
(`sandkasten.cli.main:main`, see pyproject's [project.scripts]) with its own stdin, stdout, stderr,
working directory and environment, restored afterwards.

A subprocess costs about a second here (interpreter start and the package's imports, on a
shared 2-core machine); most CLI tests check what a command prints and its exit code, which
this gives in milliseconds. Tests where the process boundary is the point (`daemon -d`, a
`logs --follow` stopped by SIGINT, `attach` under a pty, the installed script itself) keep
spawning the real one.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sandkasten.cli import main as cli


def run_cli(argv: list[str], cwd: Path | None = None, env: Mapping[str, str] | None = None,
            input: str | None = None) -> subprocess.CompletedProcess:
    """Run `sandkasten ARGV` in process; returns what a subprocess.run(..., text=True) would.

    ENV replaces the environment for the call (None: this process's, without SANDKASTEN_*
    variables, so a developer's own settings never reach a test)."""
    if env is None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SANDKASTEN_")}
    out, err = _stream(), _stream()
    with _process_state(cwd, env), _std(out, err, _stdin(input or "")):
        try:
            code = cli.main(list(argv))
        except SystemExit as e:  # Fire exits on its own for a few usage errors
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return subprocess.CompletedProcess(["sandkasten", *argv], code, _text(out), _text(err))


def _stream() -> io.TextIOWrapper:
    """A text stream with a `.buffer`, like sys.stdout (the CLI writes command output as bytes)."""
    return io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="surrogateescape", write_through=True)


def _stdin(text: str) -> io.TextIOWrapper:
    """A pipe holding TEXT, its writing end closed: a real descriptor, as a subprocess's stdin
    is (`attach` hands sys.stdin.fileno() to the terminal code)."""
    data = text.encode()
    if len(data) > 65536:
        raise ValueError("run_cli: input beyond a pipe's buffer; run the script as a subprocess")
    r, w = os.pipe()
    try:
        os.write(w, data)
    finally:
        os.close(w)
    return open(r, encoding="utf-8", errors="surrogateescape")


def _text(stream: io.TextIOWrapper) -> str:
    stream.flush()
    value = stream.buffer.getvalue().decode("utf-8", "surrogateescape")  # type: ignore[attr-defined]
    stream.close()
    return value


@contextmanager
def _std(out: io.TextIOWrapper, err: io.TextIOWrapper, stdin: io.TextIOWrapper) -> Iterator[None]:
    saved = sys.stdout, sys.stderr, sys.stdin
    sys.stdout, sys.stderr, sys.stdin = out, err, stdin
    try:
        yield
    finally:
        sys.stdout, sys.stderr, sys.stdin = saved
        stdin.close()


@contextmanager
def _process_state(cwd: Path | None, env: Mapping[str, str]) -> Iterator[None]:
    """The working directory and environment of the call; the test's own come back after it
    (a command may set variables too: help sets PAGER)."""
    saved_cwd, saved_env = os.getcwd(), dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    if cwd is not None:
        os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
