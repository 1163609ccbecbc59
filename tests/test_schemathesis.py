"""Property-based fuzzing of the whole HTTP API from its own `/openapi.json` (issue 15):
schemathesis generates at least 1,000 requests — valid and invalid bodies, queries, headers,
path parameters, some naming a real session, exec and workspace — against a real daemon,
and not one may answer with a server error (5xx)."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.daemons import API_KEY, BIN

MIN_CASES = 1000


@pytest.mark.timeout(600)
def test_no_generated_request_gets_a_server_error(daemon_factory, tmp_path):
    d = daemon_factory(limits={"max_sessions": 8}).start()   # fuzzed creates stay few and cheap
    sid = d.client.post("/v1/sessions", json={}).json()["id"]
    assert d.client.post(f"/v1/sessions/{sid}/fs/write", json={"path": "a.txt", "text": "x"}).status_code == 200
    assert d.client.post("/v1/workspaces/ws-fuzz/fs/write", json={"path": "a.txt", "text": "x"}).status_code == 200
    eid = d.client.post(f"/v1/sessions/{sid}/exec", json={"cmd": "echo hi"}).json()["exec_id"]
    pid = d.client.post(f"/v1/sessions/{sid}/processes", json={"cmd": "sleep 600", "pty": True}).json()["process_id"]
    config = tmp_path / "schemathesis.toml"   # real ids, so requests reach past the 404s
    config.write_text(f'[parameters]\nsid = "{sid}"\nwid = "ws-fuzz"\nexec_id = "{eid}"\nprocess_id = "{pid}"\n'
                      f'path = "a.txt"\n')
    report = tmp_path / "report.json"
    r = subprocess.run(
        [str(BIN / "st"), "--config-file", str(config), "run", f"{d.url}/openapi.json",
         "--checks", "not_a_server_error", "--max-examples", "40", "--seed", "15",
         # a tar body is beyond what schemathesis can generate (tests/test_workspace_archive.py fuzzes it)
         "--exclude-name", "POST /v1/sessions/{sid}/fs/archive",
         "--header", f"Authorization: Bearer {API_KEY}", "--request-timeout", "30",
         "--report", "json", "--report-json-path", str(report), "--no-color"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert report.exists(), r.stdout[-4000:] + r.stderr[-2000:]
    result = json.loads(report.read_text())
    cases = result["test_cases"]
    assert cases["generated"] >= MIN_CASES, cases
    assert (r.returncode, cases["with_failures"], cases["errored"], result["failures"]) == (0, 0, 0, []), \
        r.stdout[-6000:]
    assert "Traceback" not in d.read_log() and "unhandled error" not in d.read_log()
