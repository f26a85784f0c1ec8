"""A client of the ublkshell server's socket (the REPL and `ublkshell -c`)."""
import json
import os
import socket
import subprocess
import time

from .. import files
from ..devices import paths
from .protocol import SOCKET_PATH, encode
from ..errors import UblkError


class Client:
    def __init__(self, path: str = SOCKET_PATH, timeout: float = 300.0):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self._connect(path, timeout)
        except FileNotFoundError:
            raise UblkError(f"no ublkshell server at {path} (start one with `ublkshell serve`)") from None
        except ConnectionRefusedError:
            raise UblkError(f"the ublkshell server at {path} is not running (stale socket)") from None
        except PermissionError:
            raise UblkError(f"{path}: permission denied: the server is root-only") from None
        self.buf = b""
        self.next_id = 1

    def _connect(self, path: str, timeout) -> None:
        # a full listen backlog answers EAGAIN at once: a busy server, not a missing one
        deadline = time.monotonic() + (timeout if timeout else 60)
        while True:
            try:
                self.sock.connect(path)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    self.sock.close()
                    raise UblkError(f"the ublkshell server at {path} is too busy to take a connection") from None
                time.sleep(0.01)

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _readline(self) -> dict:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise UblkError("the ublkshell server closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def send(self, cmd: str, args: dict) -> int:
        rid = self.next_id
        self.next_id += 1
        self.sock.sendall(encode({"id": rid, "cmd": cmd, "args": args}))
        return rid

    def call(self, cmd: str, **args):
        rid = self.send(cmd, args)
        while True:
            msg = self._readline()
            if msg.get("id") is None and msg.get("ok") is False:
                # about the connection, not a request: busy, or a request it could not read
                raise UblkError(msg.get("error", "the server refused"))
            if msg.get("id") != rid or "event" in msg or msg.get("started"):
                continue
            if not msg.get("ok"):
                raise UblkError(msg.get("error", "the server refused"))
            return msg.get("result")

    def stream(self, cmd: str, **args):
        """Yield events until the command ends; closing the generator hangs up."""
        rid = self.send(cmd, args)
        while True:
            msg = self._readline()
            if msg.get("id") != rid or msg.get("started"):
                continue
            if "event" in msg:
                yield msg["event"]
                continue
            if not msg.get("ok"):
                raise UblkError(msg.get("error", "the server refused"))
            return


def server_running(path: str = SOCKET_PATH) -> bool:
    try:
        with Client(path, timeout=5) as c:
            c.call("ping")
        return True
    except (UblkError, OSError):
        return False


def ensure_server(path: str = SOCKET_PATH, timeout: float = 60.0) -> None:
    """Start `ublkshell serve` in the background unless one already answers."""
    if server_running(path):
        return
    from ..devices.spawn import daemon_command

    log = os.path.join(paths.logdir(), "server.log")
    argv, env = daemon_command("ublkshell")
    fd = files.open_nofollow(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        subprocess.Popen(argv + ["serve", "--socket", os.path.abspath(path)], stdin=subprocess.DEVNULL,
                         stdout=fd, stderr=fd, start_new_session=True, cwd="/", env=env)
    finally:
        os.close(fd)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server_running(path):
            return
        time.sleep(0.1)
    raise UblkError(f"the server did not come up within {timeout:.0f} s (log: {log})")
