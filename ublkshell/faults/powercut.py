"""`powercut ID`: the device loses power. Every write not yet made durable by a
FLUSH (or FUA) is undone in the backing store, all of them or a random subset
(`--keep P`, `--partial` = 0.5, replayable with `seed`), and the IO daemon dies
without telling the kernel, as in a crash. Needs a device added with --powercut.
"""
import os
import signal
import time

from ..devices import ids as devids
from .. import procs
from ..devices import registry
from ..errors import UblkError, UsageError
from .table import locked


def run_powercut(a: dict) -> dict:
    dev_id = a["id"]
    if a["partial"] and a["keep"] is not None:
        raise UsageError("powercut: --partial or --keep P, not both")
    keep = 0.5 if a["partial"] else (a["keep"] or 0.0)
    entry = registry.read(dev_id)
    if not entry:
        raise UblkError(f"device {devids.name(dev_id)} is not served by ublkshell")
    if not entry.get("spec", {}).get("powercut"):
        raise UblkError(f"device {devids.name(dev_id)} keeps no write log: add it with --powercut "
                        "(e.g. `add -t mem --size 1G --powercut`)")
    pid = entry["pid"]
    if not procs.entry_daemon_alive(entry):
        raise UblkError(f"device {devids.name(dev_id)}: its daemon (pid {pid}) is not running")
    with locked(dev_id) as s:
        area = s.fault_area()
        area.pc_done = 0
        area.powercut_keep = int(round(keep * 1_000_000))
        seed = int(area.seed)
        if not procs.signal_entry(entry, signal.SIGUSR1):
            raise UblkError(f"device {devids.name(dev_id)}: its daemon (pid {pid}) is gone")
    deadline = time.monotonic() + 60
    while procs.same_process(pid, entry.get("pid_start")):
        if time.monotonic() > deadline:
            raise UblkError(f"device {devids.name(dev_id)}: the daemon (pid {pid}) did not cut power within 60 s")
        time.sleep(0.05)
    with locked(dev_id) as s:
        area = s.fault_area()
        if not area.pc_done:
            raise UblkError(f"device {devids.name(dev_id)}: the daemon died before it undid the unflushed writes "
                            f"(see {entry.get('log') or 'its log'})")
        return {"device": devids.name(dev_id), "dropped": int(area.pc_dropped), "kept": int(area.pc_kept),
                "dropped_bytes": int(area.pc_dropped_bytes), "keep": keep, "seed": seed,
                "failed": int(area.pc_failed),
                "failed_error": os.strerror(int(area.pc_errno)) if area.pc_errno else None,
                "recovery": bool(entry.get("spec", {}).get("recovery"))}


def render_powercut(r: dict) -> str:
    from ..units import human

    what = (f"{r['dropped']} unflushed write{'s' if r['dropped'] != 1 else ''} "
            f"({human(r['dropped_bytes'])}) lost, {r['kept']} kept")
    if r["keep"]:
        what += f" (keep {r['keep']:g}, seed {r['seed']})"
    if r.get("failed"):
        # those writes may read back old, new or mixed data: not a state a real power cut leaves
        what += (f"; {r['failed']} could not be undone ({r['failed_error']}): "
                 "the backing store may hold their new data")
    after = (f"`recover {r['device']}` brings it back" if r["recovery"] else
             f"IO fails until `del {r['device']}`; the backing store holds the post-crash state")
    return f"dev {r['device']}: power cut: {what}; the daemon is gone: {after}"
