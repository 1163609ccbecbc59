"""A local OpenAI-compatible test server: `POST /v1/responses` (streaming and not) replaying
scripted model turns, so the quickstart agents run unmodified with no real model.

Who runs this: the test process, in a thread (stdlib `ThreadingHTTPServer` on a free loopback
port); the agents reach it through `OPENAI_BASE_URL=http://127.0.0.1:PORT/v1`.

How a reply is chosen: the conversation sent by the SDK is read back into its last user message
and the tool calls/outputs that followed it. The first `Turn` whose `prompt` occurs in that user
message answers; its `steps` are played in order, one per model call, advancing by how many tool
calls the model already made since that user message. A step is a `Say` (text, streamed in
small deltas) or a list of `Call`s (function calls) and `CustomCall`s (free-form custom tool
calls, as the SDK's sandbox `apply_patch` takes), or a function of the `Conversation` returning
one — so a final answer can quote what the sandbox really printed. `on_step` (optional) is
called with (prompt, step index) as each step is served, so a test can act at a chosen moment.

Every event and response is validated against the `openai` package's own types before it is
sent: what this server emits is exactly what the SDK parses."""

from __future__ import annotations

import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Union

import typing

from openai.types.responses import Response, ResponseStreamEvent

# every stream event class of the SDK by its `type`, to validate what we emit against exactly it
_EVENT_TYPES = {typing.get_args(cls.model_fields["type"].annotation)[0]: cls
                for cls in typing.get_args(typing.get_args(ResponseStreamEvent)[0])}


# ------------------------------------------------------------------ the script
@dataclass(frozen=True)
class Say:
    text: str


@dataclass(frozen=True)
class Call:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class CustomCall:
    """A custom tool call: `input` is the tool's raw text (e.g. an apply_patch patch)."""
    name: str
    input: str


Reply = Union[Say, list[Union[Call, CustomCall]]]
Step = Union[Reply, Callable[["Conversation"], Reply]]


@dataclass(frozen=True)
class Turn:
    prompt: str  # occurs in the last user message
    steps: list[Step]


@dataclass
class Conversation:
    """What the model was sent, reduced to what a script needs."""

    user: str = ""  # the last user message
    calls: list[dict] = field(default_factory=list)  # function calls since that message
    outputs: list[str] = field(default_factory=list)  # their outputs, in order
    users: list[str] = field(default_factory=list)  # every user message, oldest first
    instructions: str = ""
    tools: list[str] = field(default_factory=list)

    @property
    def last_output(self) -> str:
        return self.outputs[-1] if self.outputs else ""


def read_conversation(body: dict) -> Conversation:
    conv = Conversation(instructions=body.get("instructions") or "",
                        tools=[t.get("name", "") for t in body.get("tools") or []])
    items = body.get("input")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    for item in items or []:
        kind = item.get("type", "message")
        if kind == "message" and item.get("role") == "user":
            conv.user = _text(item.get("content"))
            conv.users.append(conv.user)
            conv.calls, conv.outputs = [], []
        elif kind in ("function_call", "custom_tool_call"):
            conv.calls.append(item)
        elif kind in ("function_call_output", "custom_tool_call_output"):
            out = item.get("output")
            conv.outputs.append(out if isinstance(out, str) else _text(out))
    return conv


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def choose(script: list[Turn], conv: Conversation) -> tuple[Reply, Turn | None, int]:
    """The reply, with the turn and the index of the step it comes from."""
    for turn in script:
        if turn.prompt.lower() in conv.user.lower():
            made, index = 0, 0
            for index, step in enumerate(turn.steps):  # skip the steps already played
                if made >= len(conv.calls):
                    break
                reply = step(conv) if callable(step) else step
                made += len(reply) if isinstance(reply, list) else 0
            else:
                index = len(turn.steps) - 1
            step = turn.steps[index]
            return (step(conv) if callable(step) else step), turn, index
    return Say(f"(scripted model: no turn for {conv.user[:80]!r})"), None, 0


# ------------------------------------------------------------------ Responses API objects
def _id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def _usage() -> dict:
    return {"input_tokens": 10, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": 5,
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 15}


def _response(body: dict, rid: str, status: str, output: list[dict]) -> dict:
    return {
        "id": rid, "object": "response", "created_at": int(time.time()), "status": status,
        "model": body.get("model") or "scripted", "output": output, "parallel_tool_calls": True,
        "tool_choice": "auto", "tools": [], "error": None, "incomplete_details": None,
        "instructions": body.get("instructions"), "metadata": {}, "temperature": 1.0, "top_p": 1.0,
        "usage": _usage() if status == "completed" else None,
    }


def _message(text: str, status: str = "completed", item_id: str | None = None) -> dict:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if text or \
        status == "completed" else []
    return {"type": "message", "id": item_id or _id("msg"), "role": "assistant", "status": status,
            "content": content}


def _function_call(call: Call, status: str = "completed", item_id: str | None = None,
                   call_id: str | None = None, arguments: str | None = None) -> dict:
    return {"type": "function_call", "id": item_id or _id("fc"), "call_id": call_id or _id("call"),
            "name": call.name, "status": status,
            "arguments": json.dumps(call.arguments) if arguments is None else arguments}


def _custom_call(call: CustomCall, item_id: str | None = None, call_id: str | None = None,
                 text: str | None = None) -> dict:
    return {"type": "custom_tool_call", "id": item_id or _id("ctc"), "call_id": call_id or _id("call"),
            "name": call.name, "input": call.input if text is None else text}


def _tool_call(call: Call | CustomCall) -> dict:
    return _custom_call(call) if isinstance(call, CustomCall) else _function_call(call)


def output_items(reply: Reply) -> list[dict]:
    if isinstance(reply, Say):
        return [_message(reply.text)]
    return [_tool_call(c) for c in reply]


def stream_events(body: dict, reply: Reply, chunk: int = 7) -> list[dict]:
    """The event sequence the Responses API emits for this reply."""
    rid = _id("resp")
    events: list[dict] = [{"type": "response.created", "response": _response(body, rid, "in_progress", [])},
                          {"type": "response.in_progress", "response": _response(body, rid, "in_progress", [])}]
    done_items: list[dict] = []
    if isinstance(reply, Say):
        item = _message(reply.text)
        mid, text = item["id"], reply.text
        events.append({"type": "response.output_item.added", "output_index": 0,
                       "item": _message("", "in_progress", mid)})
        events.append({"type": "response.content_part.added", "item_id": mid, "output_index": 0, "content_index": 0,
                       "part": {"type": "output_text", "text": "", "annotations": []}})
        for i in range(0, len(text), chunk):
            events.append({"type": "response.output_text.delta", "item_id": mid, "output_index": 0,
                           "content_index": 0, "delta": text[i:i + chunk], "logprobs": []})
        events.append({"type": "response.output_text.done", "item_id": mid, "output_index": 0, "content_index": 0,
                       "text": text, "logprobs": []})
        events.append({"type": "response.content_part.done", "item_id": mid, "output_index": 0, "content_index": 0,
                       "part": {"type": "output_text", "text": text, "annotations": []}})
        events.append({"type": "response.output_item.done", "output_index": 0, "item": item})
        done_items.append(item)
    else:
        for index, call in enumerate(reply):
            if isinstance(call, CustomCall):
                item = _custom_call(call)
                events.append({"type": "response.output_item.added", "output_index": index,
                               "item": _custom_call(call, item["id"], item["call_id"], "")})
                for i in range(0, len(call.input), chunk * 4):
                    events.append({"type": "response.custom_tool_call_input.delta", "item_id": item["id"],
                                   "output_index": index, "delta": call.input[i:i + chunk * 4]})
                events.append({"type": "response.custom_tool_call_input.done", "item_id": item["id"],
                               "output_index": index, "input": call.input})
                events.append({"type": "response.output_item.done", "output_index": index, "item": item})
                done_items.append(item)
                continue
            item = _function_call(call)
            args = item["arguments"]
            events.append({"type": "response.output_item.added", "output_index": index,
                           "item": _function_call(call, "in_progress", item["id"], item["call_id"], "")})
            for i in range(0, len(args), chunk * 4):
                events.append({"type": "response.function_call_arguments.delta", "item_id": item["id"],
                               "output_index": index, "delta": args[i:i + chunk * 4]})
            events.append({"type": "response.function_call_arguments.done", "item_id": item["id"],
                           "output_index": index, "arguments": args, "name": call.name})
            events.append({"type": "response.output_item.done", "output_index": index, "item": item})
            done_items.append(item)
    events.append({"type": "response.completed", "response": _response(body, rid, "completed", done_items)})
    for n, event in enumerate(events):
        event["sequence_number"] = n
        _EVENT_TYPES[event["type"]].model_validate(event)  # exactly what the SDK parses, or fail here
    return events


def full_response(body: dict, reply: Reply) -> dict:
    out = _response(body, _id("resp"), "completed", output_items(reply))
    Response.model_validate(out)
    return out


# ------------------------------------------------------------------ the HTTP server
class ScriptedOpenAI:
    """`with ScriptedOpenAI(script) as model:` → `model.base_url` for OPENAI_BASE_URL;
    `model.requests` holds every request body received (for assertions); `on_step(prompt, index)`
is called as each scripted step is served."""

    def __init__(self, script: list[Turn], on_step: Callable[[str, int], None] | None = None) -> None:
        self.script = script
        self.on_step = on_step
        self.requests: list[dict] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="scripted-openai", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> "ScriptedOpenAI":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def answer(self, body: dict) -> Reply:
        with self._lock:
            self.requests.append(body)
        reply, turn, index = choose(self.script, read_conversation(body))
        if turn is not None and self.on_step is not None:
            self.on_step(turn.prompt, index)
        return reply

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length)
                if self.path.rstrip("/") != "/v1/responses":
                    return self._json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                try:
                    body = json.loads(raw)
                    reply = owner.answer(body)
                    if body.get("stream"):
                        return self._stream(stream_events(body, reply))
                    return self._json(200, full_response(body, reply))
                except Exception as e:  # noqa: BLE001 - report to the test, answer like the API would
                    owner.errors.append(f"{type(e).__name__}: {e}")
                    return self._json(500, {"error": {"message": str(e), "type": "server_error"}})

            def _json(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _stream(self, events: list[dict]) -> None:
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("cache-control", "no-cache")
                self.send_header("connection", "close")
                self.end_headers()
                for event in events:
                    self.wfile.write(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode())
                    self.wfile.flush()
                self.close_connection = True

        return Handler
