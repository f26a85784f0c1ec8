"""The server's watch on the device daemons: it notices daemons that die (kill, crashes)
or are replaced (recover) and devices that come and go, reports each as an event, and with
`serve --auto-recover` starts a new daemon for a device added with --recovery.

The server owns no device: this only watches the registry (devices/registry.py) and asks
the kernel; a server that dies loses nothing."""
import errno
import time
import traceback

import trio

from .. import procs
from ..devices import ids as devids
from ..devices import registry
from ..errors import UblkError
from .events import log

WATCH_S = 0.5  # how often the registry is checked for dead or replaced daemons


async def keep(name: str, fn, *args) -> None:
    """Run one of the server's loops; a bug in it is logged and the loop starts again."""
    while True:
        try:
            return await fn(*args)
        except Exception as e:
            log(f"{name} failed, restarting it in 1 s: {type(e).__name__}: {e}")
            log(traceback.format_exc())
            await trio.sleep(1)


class Supervisor:
    def __init__(self, events, source, auto_recover=False):
        self.event = events
        self.source = source
        self.auto_recover = auto_recover
        self.alive = {}  # dev_id -> (daemon pid, alive)
        self.dead = {}  # dev_id -> the pid whose death was reported last
        self.recovering = set()

    async def watch(self, nursery) -> None:
        while True:
            entries = await trio.to_thread.run_sync(registry.all_entries)
            self.check(entries, nursery)
            await trio.sleep(WATCH_S)

    def check(self, entries: dict, nursery) -> None:
        """One look at the registry's entries (dev_id -> entry): report what changed."""
        for dev_id, e in entries.items():
            pid = e["pid"]
            alive = procs.entry_daemon_alive(e)
            was = self.alive.get(dev_id)
            if alive:
                self.dead.pop(dev_id, None)
            elif self.dead.get(dev_id) == pid:
                # a death already reported (and recovered, perhaps): a look at the registry
                # read before the recovery rewrote it must not report or recover it again
                continue
            if was is None:
                self.event("device-added" if alive else "device-found-dead", id=dev_id, pid=pid)
            elif pid != was[0] and alive:
                self.event("daemon-recovered", id=dev_id, pid=pid, old_pid=was[0],
                           recoveries=e.get("recoveries"), abandoned=e.get("abandoned"))
            elif was[1] and not alive:
                self.dead[dev_id] = pid
                # asking the kernel may take a moment: the watch goes on meanwhile
                nursery.start_soon(keep, "death report", self._died, nursery, dev_id, e)
            self.alive[dev_id] = (pid, alive)
        for dev_id in set(self.alive) - set(entries):
            self.event("device-deleted", id=dev_id)
            del self.alive[dev_id]
            self.dead.pop(dev_id, None)

    # -- daemon death and recovery ----------------------------------------------
    async def _died(self, nursery, dev_id: int, entry: dict) -> None:
        pid = entry["pid"]
        state = "-" if devids.is_fuse(dev_id) else await trio.to_thread.run_sync(kernel_state, dev_id)
        s = self.source.shm(dev_id)
        inflight = sum(int(s.queue(q).inflight) for q in range(s.nr_queues)) if s else None
        # `kill` marks the entry before its SIGKILL: the entry this watch read may be older
        # than the mark, so the death is checked against the entry as it is now
        now = await trio.to_thread.run_sync(registry.read, dev_id) or entry
        killed = pid in (entry.get("killed_pid"), now.get("killed_pid"))
        # `quiesce` holds the IO on purpose, for its user (or `upgrade`) to resume
        quiesced = pid == now.get("quiesced_pid")
        kind = "daemon-quiesced" if quiesced else "daemon-killed" if killed else "daemon-died"
        self.event(kind, id=dev_id, pid=pid, state=state, recovery=entry.get("recovery"),
                   inflight=inflight)
        if self.auto_recover and entry.get("recovery") and state not in ("DEAD", "GONE") \
                and not quiesced and dev_id not in self.recovering:
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


def kernel_state(dev_id: int) -> str:
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


def delete_all_ours() -> None:
    """`serve --delete-devices`: every device in the registry, on a clean stop."""
    from ..devices.lifecycle import delete

    for dev_id in registry.all_entries():
        try:
            delete(dev_id)
            log(f"deleted dev {devids.name(dev_id)}")
        except UblkError as e:
            log(f"deleting dev {devids.name(dev_id)}: {e}")
