"""The control socket, for real: a server process on a temporary socket, fed
good, malformed, oversized and unknown messages. It must answer each with an
error and stay up."""
import json
import os
import socket
import stat
import subprocess
import sys
import time

import pytest

from ublkshell.client import Client
from ublkshell.errors import UblkError


@pytest.fixture
def server(tmp_path):
    sock = str(tmp_path / "s.sock")
    env = dict(os.environ, UBLKSHELL_STATE_DIR=str(tmp_path / "state"))
    p = subprocess.Popen([sys.executable, "-m", "ublkshell", "serve", "--socket", sock, "--no-fuse"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    deadline = time.monotonic() + 30
    while not os.path.exists(sock):
        assert p.poll() is None, p.stdout.read()
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    yield sock, p
    p.terminate()
    try:
        p.wait(timeout=20)
    except subprocess.TimeoutExpired:
        p.kill()
        raise


def raw(sock_path, payload: bytes, read=True) -> list:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(sock_path)
    try:
        s.sendall(payload)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server hung up on an oversized request: its reply is still readable
    if not read:
        s.close()
        return []
    buf = b""
    try:
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    finally:
        s.close()
    return [json.loads(l) for l in buf.splitlines() if l.strip()]


def test_socket_is_root_only(server):
    sock, _ = server
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600


def test_ping_and_verbs(server):
    sock, _ = server
    with Client(sock) as c:
        assert c.call("ping")["version"] == 1
        with pytest.raises(UblkError, match="^-t/--type: unknown target 'nope'"):
            c.call("add", target="nope", size="1G")
        with pytest.raises(UblkError, match="^unknown command 'frob'$"):
            c.call("frob")
        with pytest.raises(UblkError, match="has no statistics"):
            c.call("stats", id=12345)


@pytest.mark.parametrize("payload,error", [
    (b"this is not json\n", "not JSON"),
    (b"[1,2,3]\n", "a request is a JSON object"),
    (b'{"id": 1}\n', 'request has no "cmd" string'),
    (b'{"id": 1, "cmd": "list", "args": [1]}\n', '"args" must be an object'),
    (b'{"id": {"x": 1}, "cmd": "ping"}\n', '"id" must be a number or a string'),
    (b'{"id": 1, "cmd": "stats", "args": {}}\n', "stats: ID is required"),
    (b'{"id": 1, "cmd": "stats", "args": {"id": "zero"}}\n', "ID: 'zero' is not a device id"),
    (b"\xff\xfe\n", "not JSON"),
])
def test_malformed_requests_get_an_error_and_the_server_stays_up(server, payload, error):
    sock, proc = server
    replies = raw(sock, payload)
    assert len(replies) == 1 and replies[0]["ok"] is False
    assert error in replies[0]["error"]
    with Client(sock) as c:
        assert c.call("ping")["pid"] == proc.pid


def test_oversized_request_is_refused(server):
    sock, proc = server
    replies = raw(sock, b'{"id": 1, "cmd": "ping", "args": {"pad": "' + b"x" * (2 << 20))
    assert replies and replies[0]["ok"] is False and "longer than" in replies[0]["error"]
    with Client(sock) as c:
        assert c.call("ping")["pid"] == proc.pid


def test_abrupt_disconnects_do_not_hurt(server):
    sock, proc = server
    for _ in range(20):
        raw(sock, b'{"id": 1, "cmd": "ping"', read=False)
    with Client(sock) as c:
        assert c.call("ping")["pid"] == proc.pid


def test_sigterm_stops_cleanly_and_removes_the_socket(server):
    sock, proc = server
    proc.terminate()
    assert proc.wait(timeout=20) == 0
    assert not os.path.exists(sock)


def test_second_server_on_the_same_socket_is_refused(server, tmp_path):
    sock, _ = server
    p = subprocess.run([sys.executable, "-m", "ublkshell", "serve", "--socket", sock, "--no-fuse"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 1
    assert p.stderr.strip() == f"ublkshell: a ublkshell server already listens on {sock}"
