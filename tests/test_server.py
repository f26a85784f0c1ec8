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

from ublkshell.bridge.client import Client
from ublkshell.errors import UblkError


@pytest.fixture
def server(tmp_path):
    sock = str(tmp_path / "s.sock")
    env = dict(os.environ, UBLKSHELL_STATE_DIR=str(tmp_path / "state"), UBLKSHELL_DATA_DIR=str(tmp_path / "data"))
    p = subprocess.Popen([sys.executable, "-m", "ublkshell", "serve", "--socket", sock, "--no-fuse"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    deadline = time.monotonic() + 30
    # the socket appears only once the server listens
    while not os.path.exists(sock):
        assert p.poll() is None, p.stdout.read()
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    with Client(sock) as c:
        assert c.call("ping")["pid"] == p.pid
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


# -- hostile input: nothing a client sends ends the server ----------------------
@pytest.mark.parametrize("payload,error", [
    (b"[" * 5000 + b"\n", "nests deeper than 32 levels"),
    (b'{"id": 1, "cmd": "ping", "args": {"a": ' + b"[" * 100 + b"]" * 100 + b"}}\n", "nests deeper"),
    (b'{"id": 1, "cmd": "events", "args": {"last": Infinity}}\n', "not JSON: Infinity is not a JSON number"),
    (b'{"id": 1, "cmd": "events", "args": {"last": NaN}}\n', "not JSON: NaN is not a JSON number"),
    (b'{"id": 1, "cmd": "events", "args": {"last": 1e400}}\n', "last: inf is not a whole number"),
    (b'{"id": 1, "cmd": "events", "args": {"last": 10000}}\n', "last: 10000 is out of range (1..200)"),
    (b'{"id": 1, "cmd": "events", "args": {"last": "5"}}\n', None),
    (b'{"id": 1, "cmd": "add", "args": {"target": "mem", "size": "1M", "dev_id": 1.5}}\n',
     "-n/--number: 1.5 is not a whole number"),
    (b'{"id": 1, "cmd": "add", "args": {"target": "mem", "size": "1M", "depth": 2.5}}\n',
     "-d/--depth: 2.5 is not a whole number"),
    (b'{"id": 1, "cmd": "add", "args": {"target": "mem", "size": "1M", "depth": true}}\n',
     "-d/--depth: True is not a whole number"),
    (b'{"id": 1, "cmd": "add", "args": {"target": "mem", "size": "99999999999999T"}}\n',
     "--size: 99999999999999T is out of range"),
    (b'{"id": 1, "cmd": "add", "args": {"target": "loop", "file": "/tmp/a\\u0000b"}}\n',
     "-f/--file: holds a NUL character"),
    (b'{"id": 1, "cmd": "add", "args": {"target": ["mem"]}}\n', "-t/--type: ['mem'] is not a string"),
    (b'{"id": 1, "cmd": "stats", "args": {"id": "0", "frob": 1}}\n', "stats: unknown argument 'frob'"),
    (b'{"id": 1, "cmd": "del", "args": {"ids": [' + b"1," * 2000 + b'1]}}\n', "ID: more than 1024 devices"),
    (b'{"id": 1, "cmd": "fail", "args": {"id": 0, "words": "' + b"x " * 300 + b'"}}\n', "WORD: more than 256 words"),
    (b'{"id": 1, "cmd": "seed", "args": {"id": 0, "seed": 18446744073709551616}}\n', "seed: 18446744073709551616 is out"),
    (b'{"id": 1, "cmd": "clear", "args": {"id": 0, "rule": "\\u0661"}}\n', "RULE: '\u0661' is not a whole number"),
    (b'{"id": 1, "cmd": "trace", "args": {"id": 0, "count": -1}}\n', "--count: -1 is out of range"),
    (b'{"id": "' + b"x" * 300 + b'", "cmd": "ping"}\n', '"id" is too long'),
    (b'{"id": 1, "cmd": "' + b"y" * 5000 + b'"}\n', "unknown command 'yyyy"),
])
def test_hostile_requests_get_one_line_and_the_server_stays_up(server, tmp_path, payload, error):
    sock, proc = server
    replies = raw(sock, payload)
    assert len(replies) == 1, replies
    if error is None:
        assert replies[0]["ok"] is True
    else:
        assert replies[0]["ok"] is False and error in replies[0]["error"], replies
        assert "\n" not in replies[0]["error"] and "internal error" not in replies[0]["error"]
    with Client(sock) as c:
        assert c.call("ping")["pid"] == proc.pid
    # a refused add leaves no statistics, temporary files or entries behind
    for d in (tmp_path / "state" / "devices", tmp_path / "data"):
        assert not d.exists() or os.listdir(d) == [], os.listdir(d)


def test_300_clients_at_once_all_get_an_answer(server):
    sock, proc = server
    errors, pids = [], []

    def one():
        try:
            with Client(sock, timeout=60) as c:
                pids.append(c.call("ping")["pid"])
        except UblkError as e:
            errors.append(str(e))

    import threading

    threads = [threading.Thread(target=one) for _ in range(300)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    # each one is answered, or told in one line that the server is busy: never an internal error
    assert len(pids) + len(errors) == 300
    assert all(("busy" in e) for e in errors), errors[:3]
    assert len(pids) >= 256 and set(pids) == {proc.pid}


def test_requests_in_flight_on_one_connection_are_bounded(server):
    sock, proc = server
    # 100 trace streams on one connection: the first 64 run, the rest are refused in one line each
    lines = b"".join(b'{"id": %d, "cmd": "trace", "args": {"id": "fuse9"}}\n' % i for i in range(100))
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(sock)
    s.sendall(lines)
    buf = b""
    while buf.count(b"\n") < 100:
        buf += s.recv(65536)
    s.close()
    replies = [json.loads(l) for l in buf.splitlines()]
    # fuse9 does not exist: every trace ends at once with an error, none is internal
    assert all(r["ok"] is False for r in replies)
    assert all("no statistics" in r["error"] or "too many requests" in r["error"] for r in replies), replies[:3]
    with Client(sock) as c:
        assert c.call("ping")["pid"] == proc.pid


def test_a_request_on_a_trace_connection_is_answered(server, tmp_path, monkeypatch):
    from ublkshell._native import lib
    from ublkshell.observe import shm as shm_mod

    sock, proc = server
    monkeypatch.setenv("UBLKSHELL_DATA_DIR", str(tmp_path / "data"))
    s = shm_mod.create(4, nr_queues=1, depth=8, records=16, pid=os.getpid())
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(10)
    conn.connect(sock)
    f = conn.makefile("rb")
    conn.sendall(b'{"id": "t", "cmd": "trace", "args": {"id": 4}}\n')
    assert json.loads(f.readline()) == {"id": "t", "started": True}
    # pipelined on the same connection while the stream runs
    conn.sendall(b'{"id": "p", "cmd": "ping"}\n')
    assert json.loads(f.readline())["result"]["pid"] == proc.pid
    lib.us_shm_record_io(s.base, 0, 3, lib.UBLK_IO_OP_WRITE, 64, 8, 4096, 1000)
    ev = json.loads(f.readline())
    assert ev["id"] == "t" and ev["event"]["tag"] == 3 and ev["event"]["sector"] == 64
    conn.close()
    s.close()
    with Client(sock) as c:
        assert c.call("ping")["pid"] == proc.pid


def test_socket_option_replaces_only_a_socket(tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me\n")
    env = dict(os.environ, UBLKSHELL_STATE_DIR=str(tmp_path / "state"))
    p = subprocess.run([sys.executable, "-m", "ublkshell", "serve", "--socket", str(victim), "--no-fuse"],
                       capture_output=True, text=True, timeout=30, env=env)
    assert p.returncode == 1
    assert p.stderr.strip() == (f"ublkshell: {victim} exists and is not a socket: refusing to replace it "
                                "(choose another --socket)")
    assert victim.read_text() == "keep me\n"


def test_shutdown_keeps_devices_unless_asked(server, tmp_path):
    sock, proc = server
    with Client(sock) as c:
        with pytest.raises(UblkError, match=r"^delete: 'yes' is not true or false$"):
            c.call("shutdown", delete="yes")
        assert c.call("shutdown") == {}
    assert proc.wait(timeout=20) == 0
    out = proc.stdout.read()
    assert "stopped" in out and "deleted dev" not in out


def test_a_megabyte_of_tiny_lines_is_answered_line_by_line(server):
    """30,000 requests in one write: each gets its reply (or its refusal), at the pace the
    client reads them, and the server answers others meanwhile."""
    sock, proc = server
    n = 30_000
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect(sock)
    import threading

    t = threading.Thread(target=lambda: s.sendall(b"[]\n" * n), daemon=True)
    t.start()
    f = s.makefile("rb")
    for _ in range(n):
        assert json.loads(f.readline())["error"] == "a request is a JSON object"
    t.join(10)
    s.close()
    with Client(sock) as c:
        assert c.call("ping")["pid"] == proc.pid
