"""`ublkshell serve`: the trio server behind the REPL, the FUSE stats tree and
the Python API. It owns no IO: each device keeps its own daemon process. The
server answers clients on a root-only unix socket, watches the daemons and
serves the stats tree.

Crash-only: devices belong to their daemons, so the server may die at any
moment (a bug, SIGKILL, the OOM killer) and lose nothing; a new server adopts
the devices it finds. No request, connection or stats-tree handler can end
it: each failure is answered (or logged) and the rest goes on. SIGTERM stops
it and leaves the devices running; deleting them is the explicit choice
(`serve --delete-devices`, or `shutdown` with `delete`)."""
import errno
import math
import os
import secrets
import signal
import socket
import stat
import sys
import time
import traceback

import trio

from ..devices import ids as devids
from .. import files, procs
from ..errors import UblkError, UsageError
from ..units import parse_duration
from ..validate import Arg, check, flag, whole
from ..verbs import TRACE_ARGS
from ..devices import paths, registry
from ..observe import shm as shm_mod
from .protocol import MAX_LINE, SOCKET_PATH, VERSION, ProtocolError, decode_request, encode

DEFAULT_MOUNT = "/mnt/ublkstats"
WATCH_S = 0.5  # how often the registry is checked for dead or replaced daemons
MAX_EVENTS = 200
MAX_CONNS = 256  # clients at once; more are told the server is busy
MAX_PENDING = 64  # requests in flight on one connection
STREAMS = {"trace"}  # commands that stream until the client hangs up (or count/duration)
# the commands the server answers itself (the verbs check their own, verbs.py)
SERVER_ARGS = {
    "trace": TRACE_ARGS,
    "ping": {},
    "events": {"last": Arg("last", whole(1, MAX_EVENTS), 50)},
    "shutdown": {"delete": Arg("delete", flag, False)},
}


def log(msg: str) -> None:
    sys.stderr.write(f"{time.strftime('%H:%M:%S')} ublkshell-server[{os.getpid()}]: {msg}\n")
    sys.stderr.flush()


class DeviceSource:
    """What the FUSE tree and the stream commands see: registry entries and
    each device's shared memory, kept open while the file stays the same."""

    def __init__(self):
        self._shms = {}

    def devices(self) -> dict:
        return registry.all_entries()

    def shm(self, dev_id: int):
        path = paths.stats_path(dev_id)
        try:
            ino = os.stat(path).st_ino
        except FileNotFoundError:
            self._shms.pop(dev_id, None)
            return None
        cached = self._shms.get(dev_id)
        if cached and cached[0] == ino:
            return cached[1]
        try:
            s = shm_mod.Shm(path).check()
        except (OSError, UblkError):
            return None
        self._shms[dev_id] = (ino, s)
        return s


class Conn:
    """One client connection: replies from concurrent requests go out whole, one at a time."""

    def __init__(self, stream: trio.SocketStream):
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


class Server:
    def __init__(self, socket_path=SOCKET_PATH, mountpoint=DEFAULT_MOUNT, delete_devices=False,
                 auto_recover=False):
        self.socket_path = socket_path
        self.mountpoint = mountpoint
        self.delete_devices = delete_devices
        self.auto_recover = auto_recover
        self.source = DeviceSource()
        self.alive = {}  # dev_id -> (daemon pid, alive)
        self.recovering = set()
        self.events = []  # recent server events, for `events`
        self.stop = trio.Event()
        self.conns = 0

    def event(self, kind: str, **fields) -> None:
        ev = {"t": time.time(), "kind": kind, **fields}
        self.events = (self.events + [ev])[-MAX_EVENTS:]
        # people read device names (fuse0), the events keep the protocol's numeric ids
        shown = {k: devids.name(v) if k == "id" else v for k, v in fields.items()}
        log(f"{kind}: " + ", ".join(f"{k}={v}" for k, v in shown.items()))

    # -- socket ------------------------------------------------------------
    async def _bind(self) -> trio.socket.SocketType:
        path = self.socket_path
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

    async def _serve_conn(self, stream: trio.SocketStream) -> None:
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

    async def _request(self, conn: Conn, rid, cmd: str, args: dict) -> None:
        try:
            try:
                result = await self._run(conn, rid, cmd, args)
            except UblkError as e:
                reply = {"id": rid, "ok": False, "error": _one_line(str(e))}
            except Exception as e:  # a bug must not take the server down
                log(f"internal error on {cmd}: {type(e).__name__}: {e}")
                log(traceback.format_exc())
                reply = {"id": rid, "ok": False, "error": _one_line(f"internal error: {type(e).__name__}: {e}")}
            else:
                reply = {"id": rid, "ok": True, "result": result}
            await conn.send(reply)
            if cmd == "shutdown" and reply["ok"]:
                self.stop.set()
        finally:
            conn.pending -= 1

    async def _run(self, conn: Conn, rid, cmd: str, args: dict):
        from ..verbs import VERBS, call

        if cmd in SERVER_ARGS:
            a = check(cmd, SERVER_ARGS[cmd], args)
            if cmd == "ping":
                return {"version": VERSION, "pid": os.getpid(), "mount": self.mountpoint}
            if cmd == "events":
                return self.events[-a["last"]:]
            if cmd == "shutdown":
                # the stop itself waits for this reply to go out (_request)
                self.delete_devices = self.delete_devices or a["delete"]
                return {}
            if cmd == "trace":
                return await self._trace(conn, rid, a)
        if cmd in VERBS:
            return await trio.to_thread.run_sync(call, cmd, args)
        raise UsageError(f"unknown command {cmd[:40]!r}")

    async def _trace(self, conn: Conn, rid, a: dict) -> dict:
        from ..observe.stats import Filter, Tail

        dev_id = a["id"]
        flt = Filter.parse(a["filters"])
        duration = parse_duration(a["duration"], "--duration", default_unit="s") if a["duration"] else 0
        s = self.source.shm(dev_id)
        if s is None:
            raise UblkError(f"device {devids.name(dev_id)} has no statistics (not served by ublkshell?)")
        tail = Tail(s, from_start=a["from_start"])
        # tells the client that records from here on will reach it
        if not await conn.send({"id": rid, "started": True}):
            return {}
        sent = 0
        with trio.move_on_after(duration / 1e9 if duration else math.inf):
            while True:
                for r in tail.poll():
                    if flt.match(r):
                        if not await conn.send({"id": rid, "event": r}):
                            return {}
                        sent += 1
                        if a["count"] and sent >= a["count"]:
                            return {"lost": tail.lost, "sent": sent}
                await trio.sleep(0.05)
        return {"lost": tail.lost, "sent": sent}

    async def _accept(self, sock, nursery) -> None:
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
            nursery.start_soon(self._serve_conn, stream)

    async def _refuse(self, stream: trio.SocketStream) -> None:
        with trio.move_on_after(1):
            try:
                async with stream:
                    await stream.send_all(encode({"id": None, "ok": False,
                                                  "error": f"server busy: {MAX_CONNS} connections open"}))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    # -- supervision -------------------------------------------------------
    async def _keep(self, name: str, fn, *args) -> None:
        """Run one of the server's loops; a bug in it is logged and the loop starts again."""
        while True:
            try:
                return await fn(*args)
            except Exception as e:
                log(f"{name} failed, restarting it in 1 s: {type(e).__name__}: {e}")
                log(traceback.format_exc())
                await trio.sleep(1)

    async def _watch(self, nursery) -> None:
        """Notice daemons that die (kill, crashes) or are replaced (recover), and
        devices that come and go."""
        while True:
            entries = await trio.to_thread.run_sync(registry.all_entries)
            for dev_id, e in entries.items():
                pid = e["pid"]
                alive = procs.entry_daemon_alive(e)
                was = self.alive.get(dev_id)
                if was is None:
                    self.event("device-added" if alive else "device-found-dead", id=dev_id, pid=pid)
                elif pid != was[0] and alive:
                    self.event("daemon-recovered", id=dev_id, pid=pid, old_pid=was[0],
                               recoveries=e.get("recoveries"), abandoned=e.get("abandoned"))
                elif was[1] and not alive:
                    # asking the kernel may take a moment: the watch goes on meanwhile
                    nursery.start_soon(self._keep, "death report", self._died, nursery, dev_id, e)
                self.alive[dev_id] = (pid, alive)
            for dev_id in set(self.alive) - set(entries):
                self.event("device-deleted", id=dev_id)
                del self.alive[dev_id]
            await trio.sleep(WATCH_S)

    # -- daemon death and recovery ----------------------------------------------
    async def _died(self, nursery, dev_id: int, entry: dict) -> None:
        pid = entry["pid"]
        state = "-" if devids.is_fuse(dev_id) else await trio.to_thread.run_sync(_kernel_state, dev_id)
        s = self.source.shm(dev_id)
        inflight = sum(int(s.queue(q).inflight) for q in range(s.nr_queues)) if s else None
        kind = "daemon-killed" if entry.get("killed_pid") == pid else "daemon-died"
        self.event(kind, id=dev_id, pid=pid, state=state, recovery=entry.get("recovery"),
                   inflight=inflight)
        if self.auto_recover and entry.get("recovery") and state not in ("DEAD", "GONE") \
                and dev_id not in self.recovering:
            self.recovering.add(dev_id)
            nursery.start_soon(self._recover, dev_id)

    async def _recover(self, dev_id: int) -> None:
        from ..devices.recovery import recover

        try:
            dev = await trio.to_thread.run_sync(recover, dev_id)
            # the watcher would report it too, but it knows neither the time nor that we did it
            self.alive[dev_id] = (dev["pid"], True)
            self.event("auto-recovered", id=dev_id, pid=dev["pid"], old_pid=dev.get("old_pid"),
                       recoveries=dev.get("recoveries"), abandoned=dev.get("abandoned"),
                       seconds=dev.get("seconds"))
        except UblkError as e:
            self.event("auto-recover-failed", id=dev_id, error=str(e))
        except Exception as e:  # a bug must not take the server down
            self.event("auto-recover-failed", id=dev_id,
                       error=f"internal error: {type(e).__name__}: {e}")
        finally:
            self.recovering.discard(dev_id)
    # -- end daemon death and recovery ------------------------------------------

    async def _tree(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            from .tree.fs import run_tree
        except ImportError as e:
            log(f"stats tree disabled: {e}")
            task_status.started()
            return
        started = []

        class Status:
            def started(self, value=None):
                started.append(True)
                task_status.started(value)

        try:
            await run_tree(self.mountpoint, self.source, task_status=Status())
        except Exception as e:
            # the server goes on without the tree, whether it failed before or after mounting
            log(f"stats tree on {self.mountpoint} failed: {_one_line(str(e)) or type(e).__name__}")
            if not isinstance(e, (OSError, UblkError)):
                log(traceback.format_exc())
            if not started:
                task_status.started()

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        sock = await self._bind()
        ino = os.stat(self.socket_path).st_ino
        log(f"listening on {self.socket_path}")
        stopped = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._keep, "accept loop", self._accept, sock, nursery)
                nursery.start_soon(self._keep, "daemon watch", self._watch, nursery)
                if self.mountpoint:
                    await nursery.start(self._tree)
                task_status.started()
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
                    async def on_signal():
                        async for s in sigs:
                            log(f"signal {s}: stopping")
                            self.stop.set()
                            return
                    nursery.start_soon(on_signal)
                    await self.stop.wait()
                nursery.cancel_scope.cancel()
            stopped = True
        finally:
            sock.close()
            try:
                if os.stat(self.socket_path).st_ino == ino:
                    os.unlink(self.socket_path)
            except FileNotFoundError:
                pass
            # crash-only: devices belong to their daemons; only a clean stop that was
            # asked to (serve --delete-devices, shutdown with delete) deletes them
            if stopped and self.delete_devices:
                await trio.to_thread.run_sync(_delete_ours)
            log("stopped" if stopped else "stopped by an error; the devices keep running")


def _kernel_state(dev_id: int) -> str:
    """LIVE, QUIESCED, FAIL_IO, DEAD; GONE for a deleted device, ? if unknown."""
    from ..kernel.ctrl import Control, CtrlError
    from ..kernel.uapi import STATES

    # the kernel turns a dead daemon's device QUIESCED/FAIL_IO/DEAD once its rings let go
    deadline = time.monotonic() + 5
    state = "?"
    try:
        with Control() as ctrl:
            while True:
                try:
                    st = int(ctrl.get_dev_info(dev_id).state)
                except CtrlError as e:
                    return "GONE" if e.errno == errno.ENODEV else "?"
                state = STATES.get(st, str(st))
                if state != "LIVE" or time.monotonic() > deadline:
                    return state
                time.sleep(0.05)
    except UblkError:
        return state


def _delete_ours() -> None:
    from ..devices.lifecycle import delete

    for dev_id in registry.all_entries():
        try:
            delete(dev_id)
            log(f"deleted dev {devids.name(dev_id)}")
        except UblkError as e:
            log(f"deleting dev {devids.name(dev_id)}: {e}")


def serve(socket_path=SOCKET_PATH, mountpoint=DEFAULT_MOUNT, delete_devices=False,
          auto_recover=False) -> int:
    if os.geteuid() != 0:
        raise UblkError("the server manages block devices and mounts the stats tree: run it as root")
    trio.run(Server(socket_path, mountpoint or None, delete_devices, auto_recover).run)
    return 0


def _one_line(text: str) -> str:
    return " ".join(text.split())
