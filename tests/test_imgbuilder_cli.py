"""`imgbuilder` as a user runs it: the installed console script, a real config file, real
archives; errors are one line on stderr with exit code 1, never a traceback."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from sandkasten.images.build import find_busybox

REPO = Path(__file__).resolve().parents[1]
IMGBUILDER = REPO / ".venv" / "bin" / "imgbuilder"
if not IMGBUILDER.exists():  # another venv layout: the script next to this interpreter
    IMGBUILDER = Path(sys.executable).parent / "imgbuilder"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="imgbuilder import/build need root")


@pytest.fixture
def cfg(tmp_path) -> Path:
    path = tmp_path / "sandkasten.yaml"
    path.write_text(f"data_dir: {tmp_path / 'data'}\n")
    return path


@pytest.fixture(scope="module")
def shell_tar(tmp_path_factory) -> Path:
    """A minimal importable rootfs: a static busybox as /bin/sh."""
    d = tmp_path_factory.mktemp("tar")
    busybox = find_busybox(d, lambda _m: None).read_bytes()
    path = d / "root.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for name, kind, data, mode, link in (("bin", tarfile.DIRTYPE, b"", 0o755, ""),
                                             ("bin/busybox", tarfile.REGTYPE, busybox, 0o755, ""),
                                             ("bin/sh", tarfile.SYMTYPE, b"", 0o777, "busybox")):
            ti = tarfile.TarInfo(name)
            ti.type, ti.mode, ti.linkname, ti.size = kind, mode, link, len(data)
            tf.addfile(ti, io.BytesIO(data) if data else None)
    return path


def run(*args: str, cwd: Path | None = None, env: dict | None = None, unprivileged: bool = False):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SANDKASTEN_")}
    # In a fresh user namespace without a uid map we are uid 65534 with no capabilities, yet
    # can still read the interpreter (which may live under root's 0700 home).
    prefix = ["unshare", "--user"] if unprivileged else []
    r = subprocess.run([*prefix, str(IMGBUILDER), *args], capture_output=True, text=True, cwd=cwd or "/",
                       env={**clean, **(env or {})}, stdin=subprocess.DEVNULL)
    assert "Traceback" not in r.stderr, r.stderr
    return r


def one_error_line(r) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert lines and lines[-1].startswith("imgbuilder: error: "), r.stderr
    return lines[-1]


def test_import_list_validate_delete(cfg, shell_tar):
    r = run("import", "--name", "mini", "--tar", str(shell_tar), "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "imported image mini" in r.stdout

    r = run("list", "--config", str(cfg))
    assert r.returncode == 0
    header, row = r.stdout.splitlines()
    assert header.split() == ["NAME", "SIZE", "CREATED", "SOURCE"]
    assert row.split()[0] == "mini" and row.endswith(f"tar:{shell_tar}")

    r = run("list", "--json", "--config", str(cfg))
    [image] = json.loads(r.stdout)
    assert image["name"] == "mini" and image["shell"] == "/bin/sh" and image["has_bash"] is False

    r = run("validate", "mini", "--config", str(cfg))
    assert (r.returncode, r.stdout) == (0, "image mini is valid\n")

    r = run("delete", "mini", "--config", str(cfg))
    assert (r.returncode, r.stdout) == (0, "deleted image mini\n")
    assert json.loads(run("list", "--json", "--config", str(cfg)).stdout) == []
    assert "no images" in run("list", "--config", str(cfg)).stdout


def test_validate_lists_problems_and_exits_1(cfg, tmp_path):
    tar = tmp_path / "nosh.tar"
    with tarfile.open(tar, "w") as tf:
        ti = tarfile.TarInfo("etc/hostname")
        ti.size = 3
        tf.addfile(ti, io.BytesIO(b"box"))
    r = run("import", "--name", "nosh", "--tar", str(tar), "--config", str(cfg))
    assert r.returncode == 0 and "warning: /bin/sh is missing" in r.stderr
    r = run("validate", "nosh", "--config", str(cfg))
    assert "imgbuilder: nosh: /bin/sh is missing or a broken symlink" in r.stderr
    assert one_error_line(r) == "imgbuilder: error: image nosh is not valid (1 problem)"


def test_import_from_stdin(cfg, shell_tar):
    with open(shell_tar, "rb") as f:
        r = subprocess.run([str(IMGBUILDER), "import", "--name", "piped", "--tar", "-", "--config", str(cfg)],
                           stdin=f, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    [image] = json.loads(run("list", "--json", "--config", str(cfg)).stdout)
    assert (image["name"], image["source"]) == ("piped", "tar:-")
    r = run("import", "--name", "x", "--tar", "--config", str(cfg))
    assert (r.returncode, r.stderr) == (2, "imgbuilder: error: import: --tar needs a value\n")
    assert "give --name NAME and --tar FILE" in one_error_line(run("import", "--name", "x", "--config", str(cfg)))


def test_a_wrong_argument_is_refused_before_anything_happens(cfg, shell_tar):
    assert run("import", "--name", "keep", "--tar", str(shell_tar), "--config", str(cfg)).returncode == 0
    r = run("delete", "keep", "--dry-run", "--config", str(cfg))  # deleted the image, then complained
    assert (r.returncode, r.stdout, r.stderr) == (
        2, "", "imgbuilder: error: delete: unknown option --dry-run (known: --name, --config)\n")
    r = run("list", "extra", "--config", str(cfg))  # was `list --json`
    assert (r.returncode, r.stderr) == (2, "imgbuilder: error: list: unexpected argument 'extra'\n")
    r = run("validate", "--config", str(cfg))
    assert (r.returncode, r.stderr) == (2, "imgbuilder: error: validate: missing NAME\n")
    assert [i["name"] for i in json.loads(run("list", "--json", "--config", str(cfg)).stdout)] == ["keep"]
    assert "unable to build: name the image" in one_error_line(run("build", "--config", str(cfg)))
    r = run("delete", "--help")
    assert r.returncode == 0 and "--config" in r.stdout


def test_an_archive_cut_short_is_refused_wherever_the_cut_falls(cfg, shell_tar, tmp_path):
    import gzip
    import zlib

    whole = gzip.decompress(shell_tar.read_bytes())
    with tarfile.open(fileobj=io.BytesIO(whole)) as tf:
        boundary = tf.getmembers()[-1].offset  # a cut between two members: tarfile alone ends quietly
    gz = zlib.compressobj(wbits=31)  # gzip format; a full flush ends the data exactly at the cut
    cut_gz = tmp_path / "cut.tar.gz"
    cut_gz.write_bytes(gz.compress(whole[:boundary]) + gz.flush(zlib.Z_FULL_FLUSH))
    cut_tar = tmp_path / "cut.tar"
    cut_tar.write_bytes(whole[:boundary])
    for path, why in ((cut_gz, "archive is truncated or corrupt"), (cut_tar, "archive is truncated")):
        line = one_error_line(run("import", "--name", "cut", "--tar", str(path), "--config", str(cfg)))
        assert line.startswith(f"imgbuilder: error: unable to import image 'cut' from {path}: {why}"), line
    assert os.listdir(tmp_path / "data" / "images") == []  # nothing half-imported under the name
    line = one_error_line(run("import", "--name", "dir", "--tar", str(tmp_path), "--config", str(cfg)))
    assert line.endswith(f"from {tmp_path}: it is a directory, neither a tar archive nor an OCI image layout "
                         "(no oci-layout file)")
    # a pipe is not a regular file but imports fine: `--tar <(docker export c)`
    r = subprocess.run(["bash", "-c", f'"$0" import --name piped --tar <(cat "$1") --config "$2"',
                        str(IMGBUILDER), str(shell_tar), str(cfg)], capture_output=True, text=True)
    assert r.returncode == 0 and "imported image piped" in r.stdout, r.stderr


def test_unknown_image(cfg):
    line = one_error_line(run("validate", "ghost", "--config", str(cfg)))
    assert "image 'ghost' not found" in line
    assert "not found" in one_error_line(run("delete", "ghost", "--config", str(cfg)))


def test_bad_tar(cfg, tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_text("no tar here\n" * 100)
    line = one_error_line(run("import", "--name", "bad", "--tar", str(bad), "--config", str(cfg)))
    assert "not a readable tar archive" in line
    assert os.listdir(tmp_path / "data" / "images") == []
    line = one_error_line(run("import", "--name", "bad", "--tar", str(tmp_path / "nope"), "--config", str(cfg)))
    assert "no such file" in line


def test_escaping_tar_names_the_member(cfg, tmp_path):
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tf:
        ti = tarfile.TarInfo("../../etc/evil")
        tf.addfile(ti, io.BytesIO(b""))
    line = one_error_line(run("import", "--name", "evil", "--tar", str(evil), "--config", str(cfg)))
    assert "refused member '../../etc/evil'" in line


@pytest.mark.parametrize("name", ["../x", "UPPER", "a/b", ".hidden"])
def test_bad_name(cfg, shell_tar, name):
    line = one_error_line(run("import", "--name", name, "--tar", str(shell_tar), "--config", str(cfg)))
    assert "invalid image name" in line
    assert "invalid image name" in one_error_line(run("validate", name, "--config", str(cfg)))


def test_not_root(cfg, shell_tar):
    for args in (["import", "--name", "x", "--tar", str(shell_tar)], ["build", "base"], ["delete", "x"]):
        line = one_error_line(run(*args, "--config", str(cfg), unprivileged=True))
        assert "needs root (running as uid 65534)" in line


def test_missing_config_file(tmp_path):
    line = one_error_line(run("list", "--config", str(tmp_path / "missing.yaml")))
    assert "unable to read config" in line


def test_data_dir_from_environment(tmp_path, shell_tar):
    env = {"SANDKASTEN_DATA_DIR": str(tmp_path / "envdata")}
    assert run("import", "--name", "fromenv", "--tar", str(shell_tar), cwd=tmp_path, env=env).returncode == 0
    assert (tmp_path / "envdata" / "images" / "fromenv" / "rootfs" / "bin" / "busybox").exists()
    assert [i["name"] for i in json.loads(run("list", "--json", cwd=tmp_path, env=env).stdout)] == ["fromenv"]


def test_config_in_cwd_is_the_default(cfg, shell_tar):
    assert run("import", "--name", "cwd", "--tar", str(shell_tar), cwd=cfg.parent).returncode == 0
    assert (cfg.parent / "data" / "images" / "cwd").is_dir()


def test_config_from_environment_comes_before_the_cwd_file(cfg, shell_tar, tmp_path):
    other = tmp_path / "other.yaml"
    other.write_text(f"data_dir: {tmp_path / 'otherdata'}\n")
    env = {"SANDKASTEN_CONFIG": str(other)}  # as `sandkasten` reads it, and as the usage says
    assert run("import", "--name", "env", "--tar", str(shell_tar), cwd=cfg.parent, env=env).returncode == 0
    assert (tmp_path / "otherdata" / "images" / "env").is_dir()
    assert "$SANDKASTEN_CONFIG, else ./sandkasten.yaml" in run("--help").stdout
    env = {"SANDKASTEN_CONFIG": ""}  # empty is unset, not a config named ""
    assert [i["name"] for i in json.loads(run("list", "--json", cwd=cfg.parent, env=env).stdout)] == []
    r = run("build", "--default", cwd=cfg.parent, env={"SANDKASTEN_CONFIG": str(other)})
    assert r.returncode == 0 and (tmp_path / "otherdata" / "images" / "base").is_dir(), r.stderr


def test_build_base_then_cached(cfg):
    r = run("build", "base", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("built image base")
    assert "imgbuilder: built image base" in r.stderr  # progress goes to stderr
    r = run("build", "base", "--config", str(cfg))
    assert r.returncode == 0 and "exists" in r.stdout and "--force" in r.stdout
    assert run("build", "base", "--force", "--config", str(cfg)).stdout.startswith("built image base")
    out = subprocess.run(["chroot", str(cfg.parent / "data/images/base/rootfs"), "/bin/sh", "-c", "echo hi"],
                         capture_output=True, text=True)
    assert out.stdout == "hi\n"
    assert "choose base or python" in one_error_line(run("build", "ruby", "--config", str(cfg)))


def test_help_is_readable():
    r = run("--help")
    assert r.returncode == 0 and "imgbuilder import --name NAME --tar FILE" in r.stdout
    assert run().stdout == r.stdout
    r = run("import", "--help")
    assert r.returncode == 0 and "--name" in r.stderr + r.stdout
    r = run("frobnicate")
    assert r.returncode == 2 and "unknown command 'frobnicate'" in r.stderr
