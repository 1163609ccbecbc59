"""Build the two stock images from Debian packages.

- `base`: a static busybox and a symlink per applet, plus the few files a shell expects.
  Seconds to build, ~2 MB. The busybox binary comes from Debian's `busybox-static` package:
  the host's /bin/busybox when that package is installed, else the .deb is fetched with
  `apt-get download` and unpacked with `dpkg-deb -x` into a temp dir (the host is not changed).
- `python`: a Debian minbase from `debootstrap` with python3, bash and a few tools. About a
  minute. The mirror is read from the host's apt sources: nothing here names a host.

Who runs this: `imgbuilder build`, as root. Each build fills a staging dir of the store, which
is published by rename only when the build finished (see ImageStore.staging).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from sandkasten.errors import SandkastenError
from sandkasten.images.store import ImageInfo, ImageStore, elf_interpreter

Progress = Callable[[str], None]

PYTHON_PACKAGES = ("python3", "python3-venv", "python3-pip", "ca-certificates", "procps", "less",
                   "git", "curl", "xz-utils")
DEFAULT_SUITE = "bookworm"
_PROGRESS_EVERY_S = 5.0

PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n"
GROUP = "root:x:0:\nnogroup:x:65534:\n"
HOSTS = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"


class BuildError(SandkastenError):
    code = "IMAGE_BUILD_FAILED"


def build(store: ImageStore, which: str, progress: Progress | None = None,
          force: bool = False) -> ImageInfo | None:
    """Build image WHICH ("base" or "python"); None when it exists already and not `force`."""
    builders = {"base": build_base, "python": build_python}
    if which not in builders:
        raise BuildError(f"unable to build image {which!r}: known images are {', '.join(builders)}")
    if store.exists(which) and not force:
        return None
    return builders[which](store, progress, force=force)


# ---------------------------------------------------------------- base

def build_base(store: ImageStore, progress: Progress | None = None, force: bool = False,
               name: str = "base") -> ImageInfo:
    say = progress or (lambda _msg: None)
    with tempfile.TemporaryDirectory(prefix="sandkasten-busybox-") as tmp:
        busybox = find_busybox(Path(tmp), say)
        version = _busybox_version(busybox)
        with store.staging(name, "build:base", replace=force) as rootfs:
            say(f"laying out {name} with {version or 'busybox'}")
            lay_out_base(rootfs, busybox, version)
    say(f"built image {name}")
    return store.get(name)


def find_busybox(tmp: Path, say: Progress) -> Path:
    """A static busybox: the host's if busybox-static is installed, else the unpacked .deb."""
    host = Path("/bin/busybox")
    if host.is_file() and elf_interpreter(host) is None and _runs(host):
        return host
    say("fetching busybox-static with apt-get download")
    deb = _apt_download("busybox-static", tmp, say)
    unpacked = tmp / "deb"
    _run(["dpkg-deb", "-x", str(deb), str(unpacked)], "unpack busybox-static")
    found = unpacked / "bin" / "busybox"
    if not found.is_file():
        raise BuildError(f"unable to build image base: {deb.name} has no bin/busybox")
    return found


def _apt_download(package: str, into: Path, say: Progress) -> Path:
    cmd = ["apt-get", "download", "-q", package]
    r = subprocess.run(cmd, cwd=into, capture_output=True, text=True)
    if r.returncode != 0:  # no package lists yet on a fresh machine
        say("apt-get update (package lists are missing or stale)")
        _run(["apt-get", "update", "-q"], "update apt package lists")
        _run(cmd, f"download {package}", cwd=into)
    debs = sorted(into.glob(f"{package}_*.deb"))
    if not debs:
        raise BuildError(f"unable to download {package}: apt-get left no .deb in {into}")
    return debs[-1]


def lay_out_base(rootfs: Path, busybox: Path, version: str) -> None:
    for d, mode in (("bin", 0o755), ("sbin", 0o755), ("usr/bin", 0o755), ("usr/sbin", 0o755),
                    ("etc", 0o755), ("proc", 0o555), ("sys", 0o555), ("dev", 0o755),
                    ("tmp", 0o1777), ("var/tmp", 0o1777), ("run", 0o755), ("root", 0o700),
                    ("home", 0o755), ("workspace", 0o755)):
        p = rootfs / d
        p.mkdir(parents=True, exist_ok=True)
        p.chmod(mode)
    target = rootfs / "bin" / "busybox"
    shutil.copyfile(busybox, target)
    target.chmod(0o755)
    for applet in _applets(busybox):
        link = rootfs / applet
        if link == target or link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        # relative links work both inside the sandbox and from the host (chroot, validate)
        link.symlink_to(os.path.relpath(target, link.parent))
    etc = rootfs / "etc"
    (etc / "passwd").write_text(PASSWD)
    (etc / "group").write_text(GROUP)
    (etc / "hostname").write_text("sandkasten\n")
    (etc / "hosts").write_text(HOSTS)
    (etc / "profile").write_text(
        'export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n'
        'export PS1="\\u@\\h:\\w\\$ "\n')
    (etc / "os-release").write_text(
        'NAME="Sandkasten base"\nID=sandkasten-base\nPRETTY_NAME="Sandkasten base (busybox)"\n'
        f'VERSION_ID="{version.rpartition(" v")[2]}"\n'
        'HOME_URL="about:blank"\n')


def _applets(busybox: Path) -> list[str]:
    out = _run([str(busybox), "--list-full"], "list busybox applets").stdout
    applets = [line.strip() for line in out.splitlines() if line.strip()]
    if not any(a in ("bin/sh", "usr/bin/sh") for a in applets):
        raise BuildError(f"unable to build image base: {busybox} has no sh applet")
    return applets


def _busybox_version(busybox: Path) -> str:
    r = subprocess.run([str(busybox)], capture_output=True, text=True)
    m = re.search(r"BusyBox (v\S+)", r.stdout + r.stderr)
    return f"busybox {m.group(1)}" if m else "busybox"


def _runs(binary: Path) -> bool:
    try:
        return subprocess.run([str(binary), "true"], capture_output=True).returncode == 0
    except OSError:
        return False


# ---------------------------------------------------------------- python

def build_python(store: ImageStore, progress: Progress | None = None, force: bool = False,
                 name: str = "python", packages: tuple[str, ...] = PYTHON_PACKAGES) -> ImageInfo:
    say = progress or (lambda _msg: None)
    suite = host_suite()
    mirror = host_mirror(suite)
    debootstrap = shutil.which("debootstrap") or ensure_debootstrap(say)
    with store.staging(name, "build:python", replace=force) as rootfs:
        say(f"debootstrap {suite} (minbase + {', '.join(packages)})")
        cmd = [debootstrap, "--variant=minbase", f"--include={','.join(packages)}", suite, str(rootfs),
               mirror]
        run_debootstrap(cmd, say)
        say("cleaning apt caches")
        finish_debian(rootfs)
    say(f"built image {name}")
    return store.get(name)


def ensure_debootstrap(say: Progress) -> str:
    say("installing debootstrap with apt-get")
    r = subprocess.run(["apt-get", "install", "-y", "-q", "debootstrap"], capture_output=True, text=True)
    if r.returncode != 0:
        _run(["apt-get", "update", "-q"], "update apt package lists")
        _run(["apt-get", "install", "-y", "-q", "debootstrap"], "install debootstrap")
    found = shutil.which("debootstrap") or (os.path.exists("/usr/sbin/debootstrap") and "/usr/sbin/debootstrap")
    if not found:
        raise BuildError("unable to install debootstrap: apt-get finished but no debootstrap on PATH")
    return found


def host_suite(os_release: Path = Path("/etc/os-release")) -> str:
    try:
        m = re.search(r"^VERSION_CODENAME=\"?([a-z]+)", os_release.read_text(), re.M)
    except OSError:
        m = None
    return m.group(1) if m else DEFAULT_SUITE


def host_mirror(suite: str, apt_dir: Path = Path("/etc/apt")) -> str:
    """The first Debian mirror in the host's apt sources that carries SUITE (deb822 `.sources`
    files first, then one-line `.list` files)."""
    sources = sorted((apt_dir / "sources.list.d").glob("*.sources")) if (apt_dir / "sources.list.d").is_dir() else []
    for f in sources:
        for stanza in re.split(r"\n\s*\n", f.read_text()):
            fields = _deb822(stanza)
            if ("deb" in fields.get("types", "").split() and fields.get("enabled", "yes") != "no"
                    and suite in fields.get("suites", "").split()):
                uris = fields.get("uris", "").split()
                if uris:
                    return uris[0]
    lists = [apt_dir / "sources.list"]
    if (apt_dir / "sources.list.d").is_dir():
        lists += sorted((apt_dir / "sources.list.d").glob("*.list"))
    for f in lists:
        try:
            text = f.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            words = re.sub(r"\[[^\]]*\]", "", line.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
                return words[1]
    raise BuildError(f"unable to build image python: no Debian mirror for {suite} in the host's apt "
                     f"sources ({apt_dir}/sources.list.d/*.sources or sources.list)")


def _deb822(stanza: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    key = None
    for line in stanza.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        if line[0].isspace() and key:
            fields[key] += " " + line.strip()
        elif ":" in line:
            key, value = line.split(":", 1)
            key = key.strip().lower()
            fields[key] = value.strip()
    return fields


# debootstrap's "I: <Word> ..." lines, grouped into the stages a person cares about
_STAGES = {"Retrieving": "downloading", "Validating": "downloading", "Extracting": "extracting",
           "Installing": "unpacking", "Unpacking": "unpacking", "Configuring": "configuring"}


def run_debootstrap(cmd: list[str], say: Progress) -> None:
    """Run debootstrap, summarising its output: one line per stage (preparing, downloading,
    extracting, unpacking, configuring) and one every few seconds within a long stage."""
    started = time.monotonic()
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          stdin=subprocess.DEVNULL, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}) as proc:
        assert proc.stdout is not None
        tail = _summarise(proc.stdout, say, started)
    if proc.returncode != 0:
        raise BuildError(f"unable to build image: debootstrap exited with {proc.returncode}; last output:\n"
                         + "\n".join(tail))
    say(f"debootstrap: done ({time.monotonic() - started:.0f}s)")


def _summarise(lines, say: Progress, started: float) -> list[str]:
    """Say what debootstrap is doing; return its last 30 lines (for an error message)."""
    last_say = started
    stage, count = "", 0
    tail: list[str] = []
    for line in lines:
        line = line.rstrip()
        tail = [*tail, line][-30:]
        m = re.match(r"^([IWE]): (\S+)(.*)", line)
        if not m:
            continue
        if m.group(1) in ("W", "E"):
            say(f"debootstrap: {line}")
            continue
        if m.group(2) == "Base":  # "Base system installed successfully"
            continue
        now = time.monotonic()
        new_stage = _STAGES.get(m.group(2), "preparing")
        if new_stage != stage:
            stage, count = new_stage, 0
            say(f"debootstrap: {stage} ({now - started:.0f}s)")
            last_say = now
        if m.group(2) in ("Retrieving", "Extracting", "Unpacking", "Configuring") and m.group(3).strip():
            count += 1
        if now - last_say >= _PROGRESS_EVERY_S:
            say(f"debootstrap: {stage}, {count} packages ({now - started:.0f}s)")
            last_say = now
    return tail


def finish_debian(rootfs: Path) -> None:
    """Make a debootstrapped tree a sandbox image: no apt caches, /workspace, nobody, and
    pip allowed to install (the sandbox is disposable; PEP 668's guard only gets in the way),
    no documentation."""
    for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*",
                    "var/log/*.log", "var/log/apt/*", "usr/lib/python3*/EXTERNALLY-MANAGED"):
        for p in rootfs.glob(pattern):
            if p.is_file() or p.is_symlink():
                p.unlink()
    # documentation and translations: ~70 MB nobody reads inside a sandbox
    for d in ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale"):
        for p in (rootfs / d).glob("*"):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
    (rootfs / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)
    (rootfs / "workspace").mkdir(mode=0o755, exist_ok=True)
    (rootfs / "etc/hostname").write_text("sandkasten\n")
    passwd = rootfs / "etc/passwd"
    if not re.search(r"^nobody:", passwd.read_text(), re.M):
        with passwd.open("a") as f:
            f.write("nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")
    resolv = rootfs / "etc/resolv.conf"
    if resolv.is_file() and not resolv.is_symlink():
        resolv.unlink()  # the host's copy left by debootstrap; the runtime decides networking


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise BuildError(f"unable to {what}: {cmd[0]} is not installed") from None
    if r.returncode != 0:
        detail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        raise BuildError(f"unable to {what}: {' '.join(cmd)} exited with {r.returncode}: {' | '.join(detail)}")
    return r
