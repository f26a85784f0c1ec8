"""`ublkshell serve`: the trio server behind the REPL, the FUSE stats tree and
the Python API. It owns no IO: each device keeps its own daemon process. The
server answers clients on a root-only unix socket, watches the daemons,
serves the stats tree, and on SIGTERM stops cleanly (deleting the devices
unless told to keep them)."""
import errno
import os
import signal
import socket
import sys
import time

import trio

from .. import devids
from ..errors import UblkError, UsageError
from . import registry, shm as shm_mod
from .protocol import MAX_LINE, SOCKET_PATH, VERSION, ProtocolError, decode_request, encode

DEFAULT_MOUNT = "/mnt/ublkstats"
WATCH_S = 0.5  # how often the registry is checked for dead or replaced daemons


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
        path = shm_mod.path_for(dev_id)
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


class Server:
    def __init__(self, socket_path=SOCKET_PATH, mountpoint=DEFAULT_MOUNT, keep_devices=False,
                 auto_recover=False):
        self.socket_path = socket_path
        self.mountpoint = mountpoint
        self.keep_devices = keep_devices
        self.auto_recover = auto_recover
        self.source = DeviceSource()
        self.alive = {}  # dev_id -> (daemon pid, alive)
        self.recovering = set()
        self.events = []  # recent server events, for `events`
        self.stop = trio.Event()

    def event(self, kind: str, **fields) -> None:
        ev = {"t": time.time(), "kind": kind, **fields}
        self.events = (self.events + [ev])[-200:]
        log(f"{kind}: " + ", ".join(f"{k}={v}" for k, v in fields.items()))

    # -- socket ------------------------------------------------------------
    async def _bind(self) -> trio.socket.SocketType:
        os.makedirs(os.path.dirname(self.socket_path), mode=0o700, exist_ok=True)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.socket_path)
            raise UblkError(f"a ublkshell server already listens on {self.socket_path}")
        except (FileNotFoundError, ConnectionRefusedError):
            pass
        finally:
            probe.close()
        try:
            os.unlink(self.socket_path)  # stale, left by a crash
        except FileNotFoundError:
            pass
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            await sock.bind(self.socket_path)
        finally:
            os.umask(old)
        os.chmod(self.socket_path, 0o600)
        sock.listen(64)
        return sock

    async def _serve_conn(self, stream: trio.SocketStream) -> None:
        buf = b""
        async with stream:
            while True:
                try:
                    data = await stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                if not data:
                    return
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        if not await self._request(stream, line):
                            return
                if len(buf) > MAX_LINE:
                    await self._send(stream, {"id": None, "ok": False,
                                              "error": f"request longer than {MAX_LINE} bytes"})
                    return

    async def _send(self, stream, msg: dict) -> bool:
        try:
            await stream.send_all(encode(msg))
            return True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False

    async def _request(self, stream, line: bytes) -> bool:
        from ..verbs import VERBS

        try:
            rid, cmd, args = decode_request(line)
        except ProtocolError as e:
            return await self._send(stream, {"id": None, "ok": False, "error": str(e)})
        try:
            if cmd == "ping":
                result = {"version": VERSION, "pid": os.getpid(), "mount": self.mountpoint}
            elif cmd == "events":
                result = self.events[-int(args.get("last", 50)):]
            elif cmd == "shutdown":
                self.stop.set()
                result = {}
            elif cmd == "trace":
                return await self._trace(stream, rid, args)
            elif cmd in VERBS:
                run = VERBS[cmd][0]
                result = await trio.to_thread.run_sync(run, args)
            else:
                raise UsageError(f"unknown command {cmd!r}")
        except UblkError as e:
            return await self._send(stream, {"id": rid, "ok": False, "error": str(e)})
        except (KeyError, TypeError, ValueError) as e:
            return await self._send(stream, {"id": rid, "ok": False,
                                             "error": f"bad arguments for {cmd}: {type(e).__name__}: {e}"})
        except Exception as e:  # a bug must not take the server down
            log(f"internal error on {cmd}: {type(e).__name__}: {e}")
            return await self._send(stream, {"id": rid, "ok": False,
                                             "error": f"internal error: {type(e).__name__}: {e}"})
        return await self._send(stream, {"id": rid, "ok": True, "result": result})

    async def _trace(self, stream, rid, args) -> bool:
        from ..stats import Filter, Tail

        dev_id = devids.parse(args["id"])
        flt = Filter.parse([str(w) for w in args.get("filters", [])])
        count = int(args.get("count", 0))
        s = self.source.shm(dev_id)
        if s is None:
            raise UblkError(f"device {devids.name(dev_id)} has no statistics (not served by ublkshell?)")
        tail = Tail(s, from_start=bool(args.get("from_start")))
        # tells the client that records from here on will reach it
        if not await self._send(stream, {"id": rid, "started": True}):
            return False
        state = {"sent": 0, "open": True}

        async def pump(cancel):
            while True:
                for r in tail.poll():
                    if flt.match(r):
                        if not await self._send(stream, {"id": rid, "event": r}):
                            state["open"] = False
                            cancel.cancel()
                            return
                        state["sent"] += 1
                        if count and state["sent"] >= count:
                            cancel.cancel()
                            return
                await trio.sleep(0.05)

        async def hangup(cancel):
            # a stream ends when its client hangs up: notice it even while the device is idle
            try:
                await stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            state["open"] = False
            cancel.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, nursery.cancel_scope)
            nursery.start_soon(hangup, nursery.cancel_scope)
        if not state["open"]:
            return False
        return await self._send(stream, {"id": rid, "ok": True,
                                         "result": {"lost": tail.lost, "sent": state["sent"]}})

    async def _accept(self, sock, nursery) -> None:
        while True:
            conn, _ = await sock.accept()
            nursery.start_soon(self._serve_conn, trio.SocketStream(conn))

    # -- supervision -------------------------------------------------------
    async def _watch(self, nursery) -> None:
        """Notice daemons that die (kill, crashes) or are replaced (recover), and
        devices that come and go."""
        while True:
            entries = await trio.to_thread.run_sync(registry.all_entries)
            for dev_id, e in entries.items():
                pid = e.get("pid")
                alive = registry.pid_alive(pid)
                was = self.alive.get(dev_id)
                if was is None:
                    self.event("device-added" if alive else "device-found-dead", id=dev_id, pid=pid)
                elif pid != was[0] and alive:
                    self.event("daemon-recovered", id=dev_id, pid=pid, old_pid=was[0],
                               recoveries=e.get("recoveries"), abandoned=e.get("abandoned"))
                elif was[1] and not alive:
                    # asking the kernel may take a moment: the watch goes on meanwhile
                    nursery.start_soon(self._died, nursery, dev_id, e)
                self.alive[dev_id] = (pid, alive)
            for dev_id in set(self.alive) - set(entries):
                self.event("device-deleted", id=dev_id)
                del self.alive[dev_id]
            await trio.sleep(WATCH_S)

    # -- daemon death and recovery ----------------------------------------------
    async def _died(self, nursery, dev_id: int, entry: dict) -> None:
        pid = entry.get("pid")
        state = await trio.to_thread.run_sync(_kernel_state, dev_id)
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
        from ..recovery import recover

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
            self.event("auto-recover-failed", id=dev_id, error=f"internal error: {type(e).__name__}: {e}")
        finally:
            self.recovering.discard(dev_id)
    # -- end daemon death and recovery ------------------------------------------

    async def _tree(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            from .fusetree import run_tree
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
        except (OSError, RuntimeError, UblkError) as e:
            log(f"stats tree on {self.mountpoint} failed: {e}")
            # the server goes on without the tree, whether it failed before or after mounting
            if not started:
                task_status.started()

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        sock = await self._bind()
        log(f"listening on {self.socket_path}")
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._accept, sock, nursery)
                nursery.start_soon(self._watch, nursery)
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
        finally:
            sock.close()
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass
            if not self.keep_devices:
                await trio.to_thread.run_sync(_delete_ours)
            log("stopped")


def _kernel_state(dev_id: int) -> str:
    """LIVE, QUIESCED, FAIL_IO, DEAD; GONE for a deleted device, ? if unknown."""
    from ..ctrl import Control, CtrlError
    from ..uapi import STATES

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
    from ..devices import delete

    for dev_id in registry.all_entries():
        try:
            delete(dev_id)
            log(f"deleted dev {devids.name(dev_id)}")
        except UblkError as e:
            log(f"deleting dev {devids.name(dev_id)}: {e}")


def serve(socket_path=SOCKET_PATH, mountpoint=DEFAULT_MOUNT, keep_devices=False,
          auto_recover=False) -> int:
    if os.geteuid() != 0:
        raise UblkError("the server manages block devices and mounts the stats tree: run it as root")
    trio.run(Server(socket_path, mountpoint or None, keep_devices, auto_recover).run)
    return 0
