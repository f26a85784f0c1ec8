"""The control socket's JSON-lines protocol (docs/protocol.md).

Each request is one JSON object on one line: {"id": ANY, "cmd": STR, "args": {...}}.
Each reply carries the request's id: {"id", "ok": true, "result"} or
{"id", "ok": false, "error": "one line"}. Streaming commands (trace) send
{"id", "event": {...}} lines until a final ok/error reply.
"""
import json

from ..files import default_socket

# root's is /run/ublkshell/ublkshell.sock; another user's is in their own state dir (files.py)
SOCKET_PATH = default_socket()
MAX_LINE = 1 << 20
MAX_DEPTH = 32  # nesting no request needs; deeper is refused before the decoder recurses
VERSION = 1


class ProtocolError(ValueError):
    """A request the server cannot take; the text goes back as the error."""


def encode(msg: dict) -> bytes:
    # NaN or Infinity would make a line no other JSON reader takes: refuse to write one
    # (the server turns the ValueError into an error reply)
    return (json.dumps(msg, sort_keys=True, separators=(",", ":"), allow_nan=False) + "\n").encode()


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _too_deep(line: bytes) -> bool:
    # brackets inside strings count too: a request has no reason to hold 32 of them in a row
    depth = 0
    for c in line:
        if c in b"[{":
            depth += 1
            if depth > MAX_DEPTH:
                return True
        elif c in b"]}":
            depth -= 1
    return False


def decode_request(line: bytes) -> tuple:
    """-> (id, cmd, args) or raise ProtocolError (id is None when unknown)."""
    if _too_deep(line):
        raise ProtocolError(f"a request nests deeper than {MAX_DEPTH} levels")
    try:
        # NaN and Infinity are Python's extension of JSON, not numbers any argument takes
        msg = json.loads(line, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ProtocolError(f"not JSON: {' '.join(str(e).split())[:200]}") from None
    if not isinstance(msg, dict):
        raise ProtocolError("a request is a JSON object")
    rid = msg.get("id")
    cmd = msg.get("cmd")
    args = msg.get("args", {})
    if not isinstance(rid, (int, str, type(None))) or isinstance(rid, bool):
        raise ProtocolError("\"id\" must be a number or a string")
    if isinstance(rid, str) and len(rid) > 256 or isinstance(rid, int) and abs(rid) >= 1 << 63:
        raise ProtocolError("\"id\" is too long")
    if not isinstance(cmd, str) or not cmd:
        raise ProtocolError("request has no \"cmd\" string")
    if not isinstance(args, dict):
        raise ProtocolError("\"args\" must be an object")
    return rid, cmd, args
