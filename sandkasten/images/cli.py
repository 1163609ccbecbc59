"""`imgbuilder`: import, list, validate, delete and build sandbox images.

Who runs this: an operator on the daemon's host. import/build/delete write under
`data_dir/images` and keep uids, setuid bits and device-free trees as root made them, so they
need root; list and validate only read. Errors are one line on stderr and exit code 1 (2 for
a wrong command line), never a traceback.
"""

from __future__ import annotations

import datetime as dt
import json as jsonlib
import os
import sys
import time
from collections.abc import Callable

from sandkasten import config as config_mod
from sandkasten.cli.args import Usage, call_args, config_path, show_help, wants_help
from sandkasten.errors import SandkastenError
from sandkasten.images.build import build as build_image
from sandkasten.images.store import ImageInfo, ImageStore, check_name
from sandkasten.images.tarimport import import_tar

USAGE = """\
imgbuilder: manage Sandkasten images (root filesystems under DATA_DIR/images)

usage:
  imgbuilder import --name NAME --tar FILE [--force]   import a tar or tar.gz (e.g. docker export; - for stdin)
  imgbuilder build base|python [--force]              build a stock image from Debian packages
  imgbuilder build --default                          build the config's default_image if missing
  imgbuilder list [--json]                            list images: name, size, created, source
  imgbuilder validate NAME                            check that a sandbox can start on NAME
  imgbuilder delete NAME                              remove an image

every command takes --config PATH (default: $SANDKASTEN_CONFIG, else ./sandkasten.yaml if
present, else built-in defaults; SANDKASTEN_DATA_DIR overrides data_dir).
import, build and delete need root.
"""


class Failed(Exception):
    """A one-line error for the user (exit 1)."""


def _config(config: object) -> config_mod.Config:
    """--config, else $SANDKASTEN_CONFIG, else ./sandkasten.yaml if present (as `sandkasten` reads it)."""
    return config_mod.load(config_path(str(config) if config else None))


def _store(config: object) -> ImageStore:
    return ImageStore(_config(config).images_dir)


def _need_root(verb: str) -> None:
    if os.geteuid() != 0:
        raise Failed(f"unable to {verb}: needs root (running as uid {os.geteuid()}); try sudo")


def _progress(msg: str) -> None:
    print(f"imgbuilder: {msg}", file=sys.stderr, flush=True)


def _name(value: object) -> str:
    # Fire turns `--name 123` into an int; names are strings
    return check_name(value if isinstance(value, str) else str(value))


# ---------------------------------------------------------------- commands

def import_(name: str = "", tar: str = "", force: bool = False, config: str = "") -> None:
    """Import a root filesystem from a tar archive (.tar, .tar.gz, .tar.xz; '-' reads stdin), or an
    image archive from `docker save IMAGE > x.tar` or an OCI image layout (a directory or its tar),
    whose layers are applied in order.

    Args:
      name: image name (a-z 0-9 . _ -, at most 64 characters)
      tar: path of the archive, e.g. from `docker export CONTAINER > x.tar` or `docker save IMAGE > x.tar`
      force: replace an existing image of that name
      config: path of sandkasten.yaml
    """
    if not name or not tar or isinstance(tar, bool) or isinstance(name, bool):
        raise Failed("unable to import: give --name NAME and --tar FILE")
    name = _name(name)
    _need_root("import an image")
    store = _store(config)
    started = time.monotonic()
    info = import_tar(store, name, str(tar), progress=_progress, replace=bool(force))
    problems = store.validate(name)
    for p in problems:
        _progress(f"warning: {p}")
    print(f"imported image {info.name} ({_size(info.size_bytes)}, shell {info.shell}) "
          f"in {time.monotonic() - started:.1f}s")


def list_(json: bool = False, config: str = "") -> None:
    """List images: name, size, created, source.

    Args:
      json: print a JSON array instead of a table
      config: path of sandkasten.yaml
    """
    images = _store(config).list()
    if json:
        print(jsonlib.dumps([i.to_json() for i in images], indent=2))
        return
    _table(images)


def validate(name: str, config: str = "") -> None:
    """Check that a sandbox can start on image NAME; exit 1 and list the problems if not.

    Args:
      name: image name
      config: path of sandkasten.yaml
    """
    name = _name(name)
    problems = _store(config).validate(name)
    if problems:
        for p in problems:
            print(f"imgbuilder: {name}: {p}", file=sys.stderr)
        raise Failed(f"image {name} is not valid ({len(problems)} problem{'s' * (len(problems) > 1)})")
    print(f"image {name} is valid")


def delete(name: str, config: str = "") -> None:
    """Delete image NAME (refused while a sandbox has it mounted).

    Args:
      name: image name
      config: path of sandkasten.yaml
    """
    name = _name(name)
    _need_root("delete an image")
    _store(config).delete(name)
    print(f"deleted image {name}")


def build(which: str = "", force: bool = False, config: str = "", default: bool = False) -> None:
    """Build a stock image: base (busybox, seconds) or python (Debian + python3, about a minute).

    Args:
      which: base or python
      force: rebuild even if the image exists
      config: path of sandkasten.yaml
      default: build the config's default_image if it is missing (what `make run` does)
    """
    if default:
        cfg = _config(config)
        which = cfg.default_image
        if ImageStore(cfg.images_dir).exists(which):
            print(f"default image {which} is present")
            return
        if which not in ("base", "python"):
            raise Failed(f"unable to provide default image {which!r}: it is missing and only base and "
                         f"python can be built; import it with `imgbuilder import --name {which} --tar FILE`")
    which = str(which)
    if not which:
        raise Failed("unable to build: name the image, base or python (or --default for the config's default_image)")
    if which not in ("base", "python"):
        raise Failed(f"unable to build {which!r}: choose base or python")
    _need_root(f"build image {which}")
    store = _store(config)
    if store.exists(which) and not force:
        info = store.get(which)
        print(f"image {which} exists (created {info.created_at}); use --force to rebuild")
        return
    started = time.monotonic()
    built = build_image(store, which, progress=_progress, force=bool(force))
    if built is None:   # made by someone else since the check above
        print(f"image {which} exists; use --force to rebuild")
        return
    print(f"built image {built.name} ({_size(built.size_bytes)}) in {time.monotonic() - started:.0f}s")


COMMANDS: dict[str, Callable[..., None]] = {"import": import_, "list": list_, "validate": validate,
                                             "delete": delete, "build": build}
POSITIONAL = {"build": ("which",)}  # `build base`; every other optional parameter is a --flag


# ---------------------------------------------------------------- output

def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _created(iso: str) -> str:
    try:
        return dt.datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return iso


def _table(images: list[ImageInfo]) -> None:
    rows = [(i.name, _size(i.size_bytes), _created(i.created_at), i.source) for i in images]
    header = ("NAME", "SIZE", "CREATED", "SOURCE")
    if not rows:
        print("no images; import one with `imgbuilder import` or build one with `imgbuilder build base`")
        return
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table
        table = Table(*header, box=None, header_style="bold")
        for r in rows:
            table.add_row(*r)
        Console().print(table)
        return
    widths = [max(len(r[i]) for r in [*rows, header]) for i in range(4)]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


# ---------------------------------------------------------------- entry point

def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0
    if args[0] not in COMMANDS:
        print(f"imgbuilder: error: unknown command {args[0]!r}\n\n{USAGE}", end="", file=sys.stderr)
        return 2
    try:
        if wants_help(args[1:]):
            show_help(COMMANDS, args[:1], "imgbuilder")
            return 0
        fn = COMMANDS[args[0]]
        words, kwargs = call_args(fn, args[1:], positional=POSITIONAL.get(args[0]))
        fn(*words, **kwargs)
    except Usage as e:
        print(f"imgbuilder: error: {args[0]}: {e}", file=sys.stderr)
        return 2
    except (Failed, SandkastenError) as e:
        print(f"imgbuilder: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"imgbuilder: error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("imgbuilder: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
