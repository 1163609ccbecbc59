"""One vocabulary, one schema (issue 16): statuses are StrEnums whose values are the strings the
journal always held (its hash chain unchanged), request bodies are msgspec structs that the
intake validates through with our own messages, that /openapi.json publishes and that the
client builds its bodies with."""

from __future__ import annotations

import json

import pytest

from sandkasten import intake
from sandkasten.api.openapi import document
from sandkasten.client import protocol
from sandkasten.config import from_mapping
from sandkasten.errors import InvalidRequest
from sandkasten.images.store import ImageStore
from sandkasten.schema import requests as rq
from sandkasten.schema.vocabulary import (EXEC_ENDED, PROCESS_ENDED, SESSION_ENDED, ExecStatus, ProcessStatus,
                                          SessionStatus)
from sandkasten.store.events import _chain_hash_of, canonical_json, chain_hash

CFG = from_mapping({"api_key": ""})


def test_statuses_are_the_strings_the_journal_holds():
    assert {"destroyed", "failed"} == SESSION_ENDED and {"finished", "lost"} == EXEC_ENDED
    assert {"exited", "lost"} == PROCESS_ENDED
    assert SessionStatus.RUNNING == "running" and "destroyed" in SESSION_ENDED and "running" not in SESSION_ENDED
    as_enum = {"status": SessionStatus.DESTROYED, "execs": [ExecStatus.FINISHED], "p": ProcessStatus.LOST}
    as_text = {"status": "destroyed", "execs": ["finished"], "p": "lost"}
    assert canonical_json(as_enum).encode() == canonical_json(as_text).encode()
    row = {"seq": 1, "stream_id": "s-1", "stream_version": 1, "type": "x", "schema_version": 1, "actor": "a",
           "request_id": None, "created_at": "t", "payload": as_enum}
    text_row = {**row, "payload": as_text}
    assert chain_hash("0" * 64, row) == chain_hash("0" * 64, text_row) \
        == _chain_hash_of("0" * 64, text_row, canonical_json(as_enum))


@pytest.mark.parametrize(("call", "body", "message", "field"), [
    ("exec", {}, "invalid exec request: 'cmd' must be a non-empty string", "cmd"),
    ("exec", {"cmd": "   "}, "invalid exec request: 'cmd' must be a non-empty string", "cmd"),
    ("exec", {"cmd": "a\0b"}, "invalid cmd: contains a NUL byte", "cmd"),
    ("exec", {"cmd": "x", "timeout_ms": 0}, "invalid timeout_ms 0: the minimum is 1", "timeout_ms"),
    ("exec", {"cmd": "x", "timeout_ms": 1.5}, "invalid timeout_ms 1.5: expected an integer", "timeout_ms"),
    ("exec", {"cmd": "x", "raw_output": "yes"}, "invalid raw_output 'yes': expected true or false", "raw_output"),
    ("exec", {"cmd": "x", "max_output_bytes": 1 << 40}, "the maximum is", "max_output_bytes"),
    ("exec", [], "invalid exec request: the body must be a JSON object with a 'cmd'", None),
    ("process", {"cmd": "x", "pty": {"rows": 0}}, "invalid rows 0: the minimum is 1", "rows"),
    ("process", {"cmd": "x", "pty": {"cols": 5000}}, "invalid cols 5000: the maximum is 1000", "cols"),
    ("process", {"cmd": "x", "pty": "big"}, 'invalid pty: expected {"rows": N, "cols": N} or true', "pty"),
    ("process", {"cmd": "x", "cwd": "rel"}, "invalid cwd 'rel': expected an absolute path in the sandbox", "cwd"),
    ("process", {"cmd": "x", "env": {"1A": "x"}}, 'invalid env: expected an object of NAME: "value" strings', "env"),
    ("process", {"cmd": "x", "env": {"A": 1}}, 'invalid env: expected an object of NAME: "value" strings', "env"),
    ("resize", {"rows": 30}, "invalid resize: 'cols' is required", "cols"),
    ("signal", {"signal": "SIGNOPE"}, "invalid signal 'SIGNOPE': expected a name like SIGTERM", "signal"),
    ("signal", {"signal": True}, "invalid signal True", "signal"),
    ("stdin", {"data": 1}, "invalid data: expected a string (or use data_base64 for bytes)", "data"),
    ("stdin", {"eof": "x"}, "invalid eof 'x': expected true or false", "eof"),
    ("write", {"path": 1}, "invalid write: 'path' (string) is required", "path"),
])
def test_bodies_are_refused_through_their_struct_with_our_words(call, body, message, field):
    parse = {"exec": lambda b: intake.exec_command(CFG, b), "process": lambda b: intake.process_command(CFG, b),
             "resize": intake.resize_request, "signal": intake.signal_number, "stdin": intake.stdin_data,
             "write": lambda b: intake.write_request(b, 100)}[call]
    with pytest.raises(InvalidRequest) as info:
        parse(body)
    assert message in str(info.value)
    assert info.value.details.get("field") == field


def test_a_session_body_is_refused_before_any_image_is_looked_up(tmp_path):
    images = ImageStore(tmp_path)
    for body, message, field in (
            ({"cpu_limit": 0.001}, "invalid cpu_limit 0.001: the minimum is 0.01", "cpu_limit"),
            ({"cpu_limit": float("nan")}, "invalid cpu_limit nan: expected a number", "cpu_limit"),
            ({"network_mode": "wifi"}, "invalid network_mode 'wifi': expected one of none, bridge", "network_mode"),
            ({"workspace_id": ".."}, "invalid workspace_id '..'", "workspace_id"),
            ({"egress_allow": "10.0.0.0/8"}, "expected a list of CIDRs or host names", "egress_allow"),
            ({"mode": 1}, "invalid session request: unknown field(s) mode; allowed: cpu_limit,", None)):
        with pytest.raises(InvalidRequest) as info:
            intake.session_command(CFG, images, body)
        assert message in str(info.value), body
        assert info.value.details.get("field") == field, body


def test_an_integral_number_is_an_integer_and_null_is_the_default():
    assert intake.exec_command(CFG, {"cmd": "x", "timeout_ms": 3000.0}).timeout_ms == 3000
    assert intake.exec_command(CFG, {"cmd": "x", "timeout_ms": None}).timeout_ms == CFG.defaults.exec_timeout_ms
    assert intake.process_command(CFG, {"cmd": "x", "pty": {"rows": 30, "cols": None}}).pty == (30, 80)
    assert intake.process_command(CFG, {"cmd": "x", "pty": True}).pty == (24, 80)


def test_what_the_client_sends_is_what_the_daemon_takes():
    start = protocol.start_process("s-1", "top", cwd="/tmp", env={"A": "b"}, pty=(40, 120), timeout_ms=5000)
    cmd = intake.process_command(CFG, start.json)
    assert (cmd.cmd, cmd.cwd, dict(cmd.env), cmd.pty, cmd.timeout_ms) == ("top", "/tmp", {"A": "b"}, (40, 120), 5000)
    assert intake.exec_command(CFG, protocol.exec_("s-1", "ls", 700).json).timeout_ms == 700
    assert intake.stdin_data(protocol.write_stdin("s-1", "p-1", b"\x00hi", eof=True).json) == (b"\x00hi", True)
    assert intake.resize_request(protocol.resize("s-1", "p-1", 50, 132).json) == (50, 132)
    assert intake.signal_number(protocol.signal_process("s-1", "p-1", "INT").json) == (2, "SIGINT")
    assert intake.write_request(protocol.write("a.txt", b"\xff", session_id="s-1").json, 10) == ("a.txt", b"\xff")
    assert protocol.create_session().json == {}   # nothing given, nothing sent: the daemon's defaults


def test_openapi_request_bodies_are_the_structs():
    doc = json.loads(json.dumps(document()))
    schemas = doc["components"]["schemas"]
    for struct in rq.REQUEST_BODIES:
        schema = schemas[struct.__name__]
        assert schema["additionalProperties"] is False
        assert set(schema["properties"]) == set(struct.__struct_fields__)
    assert schemas["Exec"]["required"] == ["cmd"] and schemas["Resize"]["required"] == ["rows", "cols"]
    assert schemas["CreateSession"]["properties"]["cpu_limit"]["anyOf"][0]["minimum"] == 0.01
    assert schemas["Session"]["properties"]["status"]["enum"] == [s.value for s in SessionStatus]
    refs = {json.dumps(op["requestBody"]) for path in doc["paths"].values() for op in path.values()
            if "requestBody" in op and "application/json" in op["requestBody"]["content"]}
    named = {r.split("/")[-1].rstrip('"}') for ref in refs for r in ref.split('"$ref": "')[1:]}
    assert named == {s.__name__ for s in rq.REQUEST_BODIES}, named   # every body has its struct, none left over
