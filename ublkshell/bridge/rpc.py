"""The control socket's side of the server: binding the socket, connections, requests
(JSON lines, docs/protocol.md) and the `trace` stream.

Every connection and request is its own task: one that fails is answered (or logged) and
nothing else notices. A connection is any trio stream, so tests drive this in-process
over memory streams."""
import math
import os
import secrets
import socket
import stat
import traceback

import trio

from .. import files
from ..devices import ids as devids
from ..errors import UblkError, UsageError
from ..observe.schema import SCHEMA_VERSION
from ..validate import Arg, check, flag, whole
from ..verbs import TRACE_ARGS
from .events import MAX_EVENTS, log, one_line
from .protocol import MAX_LINE, VERSION, ProtocolError, decode_request, encode

MAX_CONNS = 256  # clients at once; more are told the server is busy
MAX_PENDING = 64  # requests in flight on one connection
STREAMS = {"trace"}  # commands that stream until the client hangs up (or count/duration)
TRACE_POLL_S = 0.05
# the commands the server answers itself (the verbs check their own, verbs.py)
SERVER_ARGS = {
    "trace": TRACE_ARGS,
    "ping": {},
    "events": {"last": Arg("last", whole(1, MAX_EVENTS), 50)},
    "shutdown": {"delete": Arg("delete", flag, False)},
}


class _Shutdown:
    def __init__(self, delete: bool):
        self.delete = delete


class Conn:
    """One client connection: replies from concurrent requests go out whole, one at a time."""

    def __init__(self, stream):
        self.stream = stream
        self.lock = trio.Lock()
        self.open = True
        self.pending = 0

    async def send(self, msg: dict) -> bool:
        if not self.open:
            return False
        try:
            data = encode(msg)
        except (TypeError, ValueError) as e:  # a bug in what a verb returned: still one reply
            log(f"cannot encode a reply: {type(e).__name__}: {e}")
            data = encode({"id": msg.get("id"), "ok": False, "error": f"internal error: {type(e).__name__}: {e}"})
        try:
            async with self.lock:
                await self.stream.send_all(data)
            return True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.open = False
            return False


async def bind_socket(path: str):
    """A listening unix socket at path, mode 0600, or a one-line UblkError."""
    files.state_dir()
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(parent):
        files.private_dir(parent)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        raise UblkError(f"a ublkshell server already listens on {path}")
    except (FileNotFoundError, ConnectionRefusedError):
        pass
    finally:
        probe.close()
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        # a stale socket left by a crash is replaced; anything else is not ours to delete
        if not stat.S_ISSOCK(st.st_mode):
            raise UblkError(f"{path} exists and is not a socket: refusing to replace it "
                            "(choose another --socket)")
    # bound under a fresh name and renamed into place once it listens: a client that
    # sees the path can connect. The umask makes it 0600 from the start (a chmod by
    # path could be sent elsewhere by whoever else can write to the directory).
    tmp = f"{path}.{secrets.token_hex(8)}"
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        await sock.bind(tmp)
    except OSError as e:
        sock.close()
        raise UblkError(f"cannot create the socket {path}: {e.strerror}") from None
    finally:
        os.umask(old)
    try:
        sock.listen(socket.SOMAXCONN)
        os.rename(tmp, path)
    except BaseException:
        sock.close()
        files.unlink_quiet(tmp)
        raise
    return sock


class Rpc:
    """events: the server's Events; source: a DeviceSource; on_shutdown(delete) is called
    once the reply to `shutdown` went out; run_verb(name, args) runs a verb (verbs.call)
    and blocks, so it is run in a thread."""

    def __init__(self, events, source, mountpoint, on_shutdown, run_verb=None):
        self.events = events
        self.source = source
        self.mountpoint = mountpoint
        self.on_shutdown = on_shutdown
        if run_verb is None:
            from ..verbs import call as run_verb
        self.run_verb = run_verb
        self.conns = 0

    # -- connections -----------------------------------------------------------
    async def accept(self, sock, nursery) -> None:
        while True:
            try:
                conn, _ = await sock.accept()
            except OSError as e:
                # out of descriptors or memory: wait for some to come back, never stop listening
                log(f"accept: {e.strerror or e}")
                await trio.sleep(0.1)
                continue
            stream = trio.SocketStream(conn)
            if self.conns >= MAX_CONNS:
                nursery.start_soon(self._refuse, stream)
                continue
            self.conns += 1
            nursery.start_soon(self.serve_conn, stream)

    async def _refuse(self, stream) -> None:
        with trio.move_on_after(1):
            try:
                async with stream:
                    await stream.send_all(encode({"id": None, "ok": False,
                                                  "error": f"server busy: {MAX_CONNS} connections open"}))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def serve_conn(self, stream) -> None:
        conn = Conn(stream)
        try:
            async with stream:
                # requests run concurrently; streams (trace) end when the client hangs up,
                # one-shot requests still finish (a client may half-close after sending)
                async with trio.open_nursery() as requests:
                    async with trio.open_nursery() as streams:
                        await self._read_requests(conn, requests, streams)
                        streams.cancel_scope.cancel()
        except Exception as e:  # one connection's failure never ends the server
            log(f"connection failed: {type(e).__name__}: {e}")
            log(traceback.format_exc())
        finally:
            self.conns -= 1

    async def _read_requests(self, conn: Conn, requests, streams) -> None:
        buf = b""
        while True:
            try:
                data = await conn.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            # one split per chunk: splitting off a line at a time copies the rest each time
            *lines, buf = (buf + data).split(b"\n")
            for line in lines:
                if line.strip():
                    await self._take_request(conn, line, requests, streams)
            if len(buf) > MAX_LINE:
                await conn.send({"id": None, "ok": False, "error": f"request longer than {MAX_LINE} bytes"})
                return

    async def _take_request(self, conn: Conn, line: bytes, requests, streams) -> None:
        # refusals are sent before the next line is read: a flood of bad lines costs the
        # client its own reading speed, not a task per line in the server
        try:
            rid, cmd, args = decode_request(line)
        except ProtocolError as e:
            await conn.send({"id": None, "ok": False, "error": str(e)})
            return
        if conn.pending >= MAX_PENDING:
            await conn.send({"id": rid, "ok": False, "error": f"too many requests in flight on this "
                                                               f"connection ({MAX_PENDING}): wait for replies"})
            return
        conn.pending += 1
        (streams if cmd in STREAMS else requests).start_soon(self._request, conn, rid, cmd, args)

    # -- requests --------------------------------------------------------------
    async def _request(self, conn: Conn, rid, cmd: str, args: dict) -> None:
        stop = None
        try:
            try:
                result = await self._run(conn, rid, cmd, args)
            except UblkError as e:
                reply = {"id": rid, "ok": False, "error": one_line(str(e))}
            except Exception as e:  # a bug must not take the server down
                log(f"internal error on {cmd}: {type(e).__name__}: {e}")
                log(traceback.format_exc())
                reply = {"id": rid, "ok": False, "error": one_line(f"internal error: {type(e).__name__}: {e}")}
            else:
                stop = result if isinstance(result, _Shutdown) else None
                reply = {"id": rid, "ok": True, "result": {} if stop else result}
            await conn.send(reply)
            if reply["ok"] and stop:
                # after the reply went out: the client learns that its shutdown was taken
                self.on_shutdown(stop.delete)
        finally:
            conn.pending -= 1

    async def _run(self, conn: Conn, rid, cmd: str, args: dict):
        from ..verbs import VERBS

        if cmd in SERVER_ARGS:
            a = check(cmd, SERVER_ARGS[cmd], args)
            if cmd == "ping":
                return {"version": VERSION, "schema": SCHEMA_VERSION, "pid": os.getpid(), "mount": self.mountpoint}
            if cmd == "events":
                return self.events.last(a["last"])
            if cmd == "shutdown":
                return _Shutdown(a["delete"])
            if cmd == "trace":
                return await self._trace(conn, rid, a)
        if cmd in VERBS:
            return await trio.to_thread.run_sync(self.run_verb, cmd, args)
        raise UsageError(f"unknown command {cmd[:40]!r}")

    async def _trace(self, conn: Conn, rid, a: dict) -> dict:
        from ..observe.trace import Filter, Follow

        dev_id = a["id"]
        flt = Filter.parse(a["filters"])
        duration = a["duration"]
        s = self.source.shm(dev_id)
        if s is None:
            raise UblkError(f"device {devids.name(dev_id)} has no statistics (not served by ublkshell?)")
        f = Follow(s, flt, count=a["count"], from_start=a["from_start"], device=devids.name(dev_id))
        # tells the client that records from here on will reach it
        if not await conn.send({"id": rid, "started": True}):
            return {}
        with trio.move_on_after(duration / 1e9 if duration else math.inf):
            while True:
                for r in f.poll():
                    if not await conn.send({"id": rid, "event": r}):
                        return {}
                if f.done:
                    break
                await trio.sleep(TRACE_POLL_S)
        return {"lost": f.lost, "sent": f.shown}
