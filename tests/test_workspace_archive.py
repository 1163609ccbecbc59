"""A session's /workspace as one tar (`GET/POST /v1/sessions/{id}/fs/archive`) against a real
daemon: binary files, symlinks and hard links survive a round trip; a hostile tar never writes
outside the workspace on the host; the X-Agent-Run header lands in the journaled actor."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import tarfile
import time
from pathlib import Path

import httpx
import pytest

from sandkasten.errors import PathRefused
from tests.test_api import assert_error, create, run


def tar_of(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def entry(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "", mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, linkname, mode
    return info


def download(daemon, sid: str) -> bytes:
    with daemon.client.stream("GET", f"/v1/sessions/{sid}/fs/archive") as r:
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-tar", r.read()
        return b"".join(r.iter_bytes())


def upload(daemon, sid: str, data: bytes) -> httpx.Response:
    return daemon.client.post(f"/v1/sessions/{sid}/fs/archive", content=data,
                              headers={"content-type": "application/x-tar"})


def test_round_trip_keeps_binary_files_symlinks_hardlinks_and_modes(daemon):
    a, b = create(daemon)["id"], create(daemon)["id"]
    blob = os.urandom(300_000)
    daemon.client.post(f"/v1/sessions/{a}/fs/write", json={
        "path": "data/blob.bin", "content_base64": base64.b64encode(blob).decode()})
    run(daemon, a, "cd /workspace && mkdir -p src/deep/er && echo 'print(1)' > src/app.py && chmod 755 src/app.py "
                   "&& ln -s src/app.py app-link && ln -s /etc etc-link && ln data/blob.bin data/again "
                   "&& mkfifo pipe && : > empty && echo x > src/deep/er/leaf")
    tar = download(daemon, a)
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        members = {m.name: m for m in t}
    assert members["etc-link"].issym() and members["etc-link"].linkname == "/etc"   # a symlink, not /etc itself
    assert not any(name.startswith("etc-link/") for name in members)
    assert members["app-link"].issym() and members["app-link"].linkname == "src/app.py"
    assert {members["data/again"].type, members["data/blob.bin"].type} == {tarfile.LNKTYPE, tarfile.REGTYPE}
    assert "pipe" not in members and members["src/app.py"].mode == 0o755
    assert not any(n.startswith(("/", "./")) for n in members)   # relative to /workspace, like the SDK's

    with tarfile.open(fileobj=io.BytesIO(tar)) as t:   # a portable tar without the host-only symlink
        kept = [(m, t.extractfile(m).read() if m.isfile() else None) for m in t if m.name != "etc-link"]
    for m, data in kept:
        if data is not None:
            m.size = len(data)
    r = upload(daemon, b, tar_of(*kept))
    assert r.status_code == 200 and r.json() == {"ok": True, "members": len(kept)}, r.text
    out = run(daemon, b, "cd /workspace && md5sum data/blob.bin data/again | cut -d' ' -f1; readlink app-link; "
                         "stat -c '%a %u' src/app.py; stat -c %i data/blob.bin data/again | uniq | wc -l; "
                         "cat src/deep/er/leaf; stat -c %s empty")["stdout"].split()
    md5 = hashlib.md5(blob).hexdigest()
    assert out == [md5, md5, "src/app.py", "755", "65534", "1", "x", "0"], out   # owned by the sandbox user


ATTACKS = [  # (what the tar holds, the member named in the refusal)
    ([(entry("/etc/sk-evil"), b"x")], "/etc/sk-evil"),
    ([(entry("../sk-evil"), b"x")], "../sk-evil"),
    ([(entry("a/../../sk-evil"), b"x")], "a/../../sk-evil"),
    ([(entry("etc", tarfile.SYMTYPE, "/etc"), None)], "/workspace/etc"),
    ([(entry("up", tarfile.SYMTYPE, "../.."), None)], "/workspace/up"),
    ([(entry("d/up", tarfile.SYMTYPE, "../../etc"), None)], "/workspace/d/up"),
    ([(entry("inside", tarfile.SYMTYPE, "."), None), (entry("inside/../../sk-evil"), b"x")], "inside/../../sk-evil"),
    ([(entry("pw", tarfile.LNKTYPE, "/etc/passwd"), None)], "/workspace/pw"),
    ([(entry("pw", tarfile.LNKTYPE, "never-extracted"), None)], "/workspace/pw"),
    ([(entry("null", tarfile.CHRTYPE), None)], "/workspace/null"),
    ([(entry("disk", tarfile.BLKTYPE), None)], "/workspace/disk"),
    ([(entry("fifo", tarfile.FIFOTYPE), None)], "/workspace/fifo"),
]


@pytest.mark.parametrize("members,named", ATTACKS, ids=[a[1] for a in ATTACKS])
def test_hostile_members_are_refused_and_nothing_lands_outside(daemon, members, named):
    sid = create(daemon)["id"]
    body = assert_error(upload(daemon, sid, tar_of(*members)), 400, "PATH_REFUSED")
    assert named in body["message"] and body["message"].startswith("unable to extract"), body
    assert not os.path.lexists("/etc/sk-evil")
    for root in (daemon.data_dir, daemon.data_dir / "sessions", daemon.data_dir / "sessions" / sid):
        assert not os.path.lexists(root / "sk-evil")


def test_a_symlink_to_etc_is_never_followed_on_the_host(daemon, tmp_path):
    sid = create(daemon)["id"]
    victim = tmp_path / "victim"
    victim.mkdir()
    # the sandbox user plants symlinks to host paths (inside the sandbox they mean something else)
    run(daemon, sid, f"ln -s /etc /workspace/etc; ln -s {victim} /workspace/victim; mkdir /workspace/ok")
    for name in ("etc/sk-evil", "victim/pwned", "etc/passwd"):
        body = assert_error(upload(daemon, sid, tar_of((entry(name), b"pwned\n"))), 400, "PATH_REFUSED")
        assert "symlink" in body["message"], body
    assert list(victim.iterdir()) == [] and not os.path.lexists("/etc/sk-evil")
    assert b"pwned" not in Path("/etc/passwd").read_bytes()
    # a tar may replace such a symlink by a file of its own: the link is replaced, never written through
    r = upload(daemon, sid, tar_of((entry("victim"), b"now a file\n"), (entry("ok/f"), b"fine")))
    assert r.status_code == 200, r.text
    assert run(daemon, sid, "cat /workspace/victim /workspace/ok/f")["stdout"] == "now a file\nfine"
    assert list(victim.iterdir()) == []


def test_sizes_malformed_tars_and_ended_sessions_get_clear_errors(daemon_factory):
    daemon = daemon_factory(limits={"max_file_bytes": 1000, "max_archive_bytes": 200_000}).start()
    sid = create(daemon)["id"]
    body = assert_error(upload(daemon, sid, tar_of((entry("big.bin"), b"x" * 1001))), 413, "PAYLOAD_TOO_LARGE")
    assert "big.bin" in body["message"] and "1000" in body["message"]
    many = tar_of(*[(entry(f"f{i}"), os.urandom(900)) for i in range(300)])
    body = assert_error(upload(daemon, sid, many), 413, "PAYLOAD_TOO_LARGE")
    assert "max_archive_bytes" in body["message"] and "200000" in body["message"], body
    assert_error(upload(daemon, sid, b"this is not a tar at all" * 40), 400, "INVALID_REQUEST")
    cut = tar_of((entry("a"), b"y" * 900))[:700]
    assert "malformed" in assert_error(upload(daemon, sid, cut), 400, "INVALID_REQUEST")["message"]
    assert daemon.client.get("/healthz").status_code == 200
    daemon.client.delete(f"/v1/sessions/{sid}")
    assert_error(daemon.client.get(f"/v1/sessions/{sid}/fs/archive"), 410, "SESSION_ENDED")
    assert_error(upload(daemon, sid, tar_of((entry("a"), b"y"))), 410, "SESSION_ENDED")
    assert_error(daemon.client.get("/v1/sessions/s-nope/fs/archive"), 404, "SESSION_NOT_FOUND")


def test_agent_run_header_is_journaled_as_part_of_the_actor(daemon):
    sid = create(daemon)["id"]
    run_id = "trace_" + "ab12" * 8
    r = daemon.client.post(f"/v1/sessions/{sid}/exec", json={"cmd": "echo from-the-run"},
                           headers={"X-Agent-Run": run_id})
    assert r.status_code == 200, r.text
    run(daemon, sid, "echo without-a-run")
    for bad in ("", "has space", "x" * 129, "-leading-dash", "ünicode"):
        body = assert_error(daemon.client.post(f"/v1/sessions/{sid}/exec", json={"cmd": "echo no"},
                                               headers={"X-Agent-Run": bad.encode()}),
                            400, "INVALID_REQUEST")
        assert body["details"] == {"header": "X-Agent-Run"}
    out = daemon.cli("audit", "export", "--format", "jsonl")
    assert out.returncode == 0, out.stderr
    rows = {row["cmd"]: row for row in map(json.loads, out.stdout.splitlines())}
    assert rows["echo from-the-run"]["actor"].endswith(f"/run:{run_id}")
    assert rows["echo from-the-run"]["actor"].startswith("api:")
    assert "/run:" not in rows["echo without-a-run"]["actor"]
    assert "echo no" not in rows   # refused before anything was journaled


def test_a_client_leaving_mid_download_stops_the_packer_and_leaks_nothing(daemon):
    sid = create(daemon)["id"]
    run(daemon, sid, "head -c 30000000 /dev/urandom > /workspace/big.bin && echo small > /workspace/z.txt")
    fds = lambda: len(os.listdir(f"/proc/{daemon.proc.pid}/fd"))  # noqa: E731
    before = fds()
    for _ in range(3):
        with daemon.client.stream("GET", f"/v1/sessions/{sid}/fs/archive") as r:
            assert r.status_code == 200
            next(r.iter_raw(65536))   # then the connection is dropped with most of the tar unsent
    whole = download(daemon, sid)
    with tarfile.open(fileobj=io.BytesIO(whole)) as t:
        assert {m.name: m.size for m in t} == {"big.bin": 30_000_000, "z.txt": 6}
    deadline = time.monotonic() + 10
    while fds() > before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert fds() <= before


# ------------------------------------------------------------------ the same, in-process, with both resolvers
@pytest.fixture(params=["openat2", "walk"])
def archive_pair(request, tmp_path):
    from sandkasten.files import workspace_fs
    from sandkasten.files.workspace_archive import WorkspaceArchive
    from tests.test_workspace_fs import fds_left, open_fds, snapshot

    if request.param == "openat2" and not workspace_fs.openat2_available():
        pytest.skip("kernel without openat2")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "canary").write_bytes(b"host secret\n")
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    before_fds, before_outside = open_fds(tmp_path), snapshot(outside)
    uid, gid = os.getuid(), os.getgid()
    yield (WorkspaceArchive(src, uid=uid, gid=gid, resolver=request.param),
           WorkspaceArchive(dst, uid=uid, gid=gid, resolver=request.param), outside)
    assert not fds_left(tmp_path, before_fds), "descriptor leak"
    assert snapshot(outside) == before_outside, "a file outside the workspace changed"


def test_pack_never_follows_a_symlink_and_unpack_never_writes_through_one(archive_pair):
    src, dst, outside = archive_pair
    (src.root / "d").mkdir()
    (src.root / "d" / "f.bin").write_bytes(b"\x00\xff" * 1000)
    (src.root / "out").symlink_to(outside)             # into the host's directory: packed as a link
    (src.root / "d" / "up").symlink_to("../../outside")
    buf = io.BytesIO()
    assert src.pack(buf) == 4
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as t:
        names = {m.name: m for m in t}
    assert set(names) == {"d", "d/f.bin", "d/up", "out"} and names["out"].linkname == str(outside)
    assert b"host secret" not in buf.getvalue()

    with pytest.raises(PathRefused):                    # a link out, refused by default
        dst.unpack(io.BytesIO(buf.getvalue()))
    assert dst.unpack(io.BytesIO(buf.getvalue()), external_symlinks=True) == 4
    assert os.readlink(dst.root / "out") == str(outside) and (dst.root / "d" / "f.bin").read_bytes() == b"\x00\xff" * 1000
    hostile = tar_of((entry("out/canary"), b"overwritten"), (entry("d/up/canary"), b"overwritten"))
    with pytest.raises(PathRefused, match="symlink"):
        dst.unpack(io.BytesIO(hostile), external_symlinks=True)
    (dst.root / "d" / "up").unlink()
    with pytest.raises(PathRefused, match="symlink"):
        dst.unpack(io.BytesIO(tar_of((entry("out/new"), b"x"))), external_symlinks=True)
