"""The control socket's JSON-lines protocol (docs/protocol.md).

Each request is one JSON object on one line: {"id": ANY, "cmd": STR, "args": {...}}.
Each reply carries the request's id: {"id", "ok": true, "result"} or
{"id", "ok": false, "error": "one line"}. Streaming commands (trace) send
{"id", "event": {...}} lines until a final ok/error reply.
"""
import json
import os

from .registry import STATE_DIR

SOCKET_PATH = os.environ.get("UBLKSHELL_SOCKET", os.path.join(STATE_DIR, "ublkshell.sock"))
MAX_LINE = 1 << 20
VERSION = 1


class ProtocolError(ValueError):
    """A request the server cannot take; the text goes back as the error."""


def encode(msg: dict) -> bytes:
    return (json.dumps(msg, sort_keys=True, separators=(",", ":")) + "\n").encode()


def decode_request(line: bytes) -> tuple:
    """-> (id, cmd, args) or raise ProtocolError (id is None when unknown)."""
    try:
        msg = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"not JSON: {e}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("a request is a JSON object")
    rid = msg.get("id")
    cmd = msg.get("cmd")
    args = msg.get("args", {})
    if not isinstance(cmd, str) or not cmd:
        raise ProtocolError("request has no \"cmd\" string")
    if not isinstance(args, dict):
        raise ProtocolError("\"args\" must be an object")
    if not isinstance(rid, (int, str, type(None))) or isinstance(rid, bool):
        raise ProtocolError("\"id\" must be a number or a string")
    return rid, cmd, args
