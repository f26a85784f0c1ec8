"""`ublkshell crashtest [--fs FS] -- WORKLOAD...`: run a workload once on a logging device,
then check the file system in every crash state the log allows (crash/states.py says which),
without running the workload again.

1. A mem device with `--log-writes` (ublk where the kernel has ublk_drv, else FUSE on a loop
   device); mkfs; a mark; mount; the workload runs in the mount (cwd, $UBLKSHELL_MNT); a mark;
   unmount; the device goes (its log ends with its held writes and an end mark).
2. From the mark after mkfs on, each epoch's states are built from a base image (the state at
   the previous persistence point, advanced epoch by epoch, never replayed from the start):
   copy the base, apply the state's writes in log order.
3. Each state: mount it (the journal replays; a mount that fails is a finding), run --check
   in it, unmount, then the file system's own checker read-only (fsck.ext4 -fn, xfs_repair
   -n, btrfs check --readonly). `--fs none`: no file system, --check gets the image.
4. States run in parallel (--jobs, default the CPU count); the first epoch with a failing
   state ends the run (--keep-going: all), and its first failure is reported with the epoch's
   writes and the `replay` command that rebuilds it."""
from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from ..errors import UblkError, UsageError
from ..validate import Arg, check, flag, text, whole
from .logwrites import Log, flag_names
from .progress import Progress
from .replay import apply_to_file
from .states import epochs, states

START_MARK = "crashtest-start"
DONE_MARK = "crashtest-workload-done"
FS = {  # mkfs argv, checker argv (read-only), mount type
    "ext4": (["mkfs.ext4", "-q", "-F"], ["fsck.ext4", "-fn"], "ext4"),
    "xfs": (["mkfs.xfs", "-q", "-f"], ["xfs_repair", "-n"], "xfs"),
    "btrfs": (["mkfs.btrfs", "-q", "-f"], ["btrfs", "check", "--readonly"], "btrfs"),
    "none": (None, None, None),
}
TAIL = 15
KINDS = {"base": "none of the epoch's writes persisted", "prefix": "the epoch's first writes persisted",
         "drop": "one write of the epoch lost", "random": "a random subset of the epoch persisted",
         "all": "every write of the epoch persisted"}

CRASHTEST_ARGS = {
    "workload": Arg("WORKLOAD", lambda v, label: _argv(v, label), required=True),
    "fs": Arg("--fs", text(16), "ext4"),
    "size": Arg("--size", text(64), "256M"),
    "mkfs_opts": Arg("--mkfs-opts", text(), ""),
    "mount_opts": Arg("--mount-opts", text(), ""),
    "check": Arg("--check", text()),
    "states": Arg("--states", whole(0, 10_000), 8),
    "max_states": Arg("--max-states", whole(1, 10_000_000), 2000),
    "seed": Arg("--seed", whole(0, 2**63), 0),
    "jobs": Arg("--jobs", whole(1, 256)),
    "log": Arg("--log", text()),
    "workdir": Arg("--workdir", text()),
    "keep_going": Arg("--keep-going", flag, False),
    "json": Arg("--json", flag, False),
}


def _argv(value, label):
    if not isinstance(value, list) or not value or not all(isinstance(w, str) for w in value):
        raise UsageError(f"{label}: give the workload after `--` (e.g. -- sh -c 'echo hi > f; sync')")
    return [text()(w, label) for w in value]


def run(args: dict) -> int:
    a = check("crashtest", CRASHTEST_ARGS, args)
    from ..units import parse_size

    if a["fs"] not in FS:
        raise UsageError(f"crashtest: --fs {a['fs']!r}: choose from {', '.join(FS)}")
    if a["fs"] == "none" and not a["check"]:
        raise UsageError("crashtest: --fs none has no file system to check: give --check CMD ({} is the image)")
    size = parse_size(a["size"], "--size", lo=16 << 20, hi=64 << 30)
    needed = [FS[a["fs"]][0][0], FS[a["fs"]][1][0]] if a["fs"] != "none" else []
    for tool in needed:
        if not shutil.which(tool):
            raise UblkError(f"crashtest: {tool} is not installed (needed for --fs {a['fs']})")
    user_check = shlex.split(a["check"]) if a["check"] else None
    if a["check"] and not user_check:
        raise UsageError("crashtest: --check: an empty command")
    run_ = Run(a, size, user_check)
    try:
        return run_.go()
    finally:
        run_.cleanup()


def _say(msg: str) -> None:
    print(f"crashtest: {msg}", file=sys.stderr, flush=True)


def _tail(out: bytes) -> str:
    return "\n".join(out.decode(errors="replace").splitlines()[-TAIL:])


def _one_line(out: bytes) -> str:
    """A tool's last words, for a one-line error."""
    return " | ".join(ln.strip() for ln in out.decode(errors="replace").splitlines()[-3:] if ln.strip())


class Run:
    def __init__(self, a: dict, size: int, user_check):
        self.a, self.size, self.user_check = a, size, user_check
        self.fs = a["fs"]
        self.mkfs, self.fsck, self.fstype = FS[self.fs]
        self.jobs = a["jobs"] or os.cpu_count() or 1
        if a["workdir"]:
            if not os.path.isdir(a["workdir"]):
                raise UsageError(f"crashtest: --workdir {a['workdir']}: not a directory")
        self.work = tempfile.mkdtemp(prefix="ublkshell-crashtest-", dir=a["workdir"])
        self.log = os.path.abspath(a["log"]) if a["log"] else os.path.join(self.work, "run.log")
        self.dev = None
        self.mounted = set()
        self.keep_log = bool(a["log"])
        self.fs_done = "mkfs" if self.mkfs else "the start"

    # -- 1: the workload, logged ----------------------------------------------------------
    def record(self) -> None:
        from ..crash.logdevice import check_spec
        from ..devices import lifecycle
        from ..devices.targets import build_spec
        from ..kernel.ctrl import CONTROL_PATH

        ublk = os.path.exists(CONTROL_PATH)
        spec = build_spec("mem", size=str(self.size), transport="ublk" if ublk else "fuse", loop=not ublk)
        spec["log_writes"] = check_spec(self.log, None, None)
        self.dev = lifecycle.add(spec)
        path = f"/dev/ublkb{self.dev['id']}" if ublk else self.dev["loop"]
        _say(f"device {self.dev['name']} ({path}), log {self.log}")
        if self.mkfs:
            self._tool(self.mkfs + shlex.split(self.a["mkfs_opts"]) + [path], "mkfs")
        self._flush(path)
        self._mark(START_MARK)
        mnt = os.path.join(self.work, "mnt")
        os.mkdir(mnt)
        env = dict(os.environ, UBLKSHELL_DEV=path)
        cwd = self.work
        if self.fstype:
            self._mount(path, mnt, self.a["mount_opts"])
            env["UBLKSHELL_MNT"] = cwd = mnt
        try:
            _say(f"workload: {shlex.join(self.a['workload'])}")
            p = subprocess.run(self.a["workload"], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                               stdout=2 if self.a["json"] else None)
        except OSError as e:
            raise UblkError(f"crashtest: the workload: {self.a['workload'][0]}: {e.strerror}") from None
        finally:
            self._mark(DONE_MARK)
            if self.fstype:
                self._umount(mnt)
        if p.returncode:
            raise UblkError(f"crashtest: the workload exited {p.returncode}: fix it first (nothing was checked)")
        self._delete()

    def _tool(self, argv, what) -> None:
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True)
        if p.returncode:
            raise UblkError(f"crashtest: {what} failed ({shlex.join(argv)}, exit {p.returncode}): "
                            f"{_one_line(p.stdout + p.stderr)}")

    def _flush(self, path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _mark(self, name) -> None:
        from .marks import run_mark

        run_mark({"id": self.dev["id"], "name": name})

    def _mount(self, src, mnt, opts, loop=False) -> subprocess.CompletedProcess:
        o = ",".join(x for x in ("loop" if loop else "", opts) if x)
        argv = ["mount", "-t", self.fstype] + (["-o", o] if o else []) + [src, mnt]
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True)
        if p.returncode == 0:
            self.mounted.add(mnt)
        elif not loop:
            raise UblkError(f"crashtest: mount failed ({shlex.join(argv)}): {_one_line(p.stdout + p.stderr)}")
        return p

    def _umount(self, mnt) -> int:
        p = subprocess.run(["umount", mnt], stdin=subprocess.DEVNULL, capture_output=True)
        if p.returncode:
            subprocess.run(["umount", "-l", mnt], stdin=subprocess.DEVNULL, capture_output=True)
        self.mounted.discard(mnt)
        return p.returncode

    def _delete(self) -> None:
        if self.dev is not None:
            from ..devices import lifecycle

            dev, self.dev = self.dev, None
            lifecycle.delete(dev["id"])

    # -- 2 and 3: the crash states ------------------------------------------------------
    def go(self) -> int:
        t0 = time.monotonic()
        self.record()
        with Log(self.log) as log:
            entries = list(log)
            start = next((e.index for e in entries if e.mark == START_MARK), None)
            if start is None:
                raise UblkError(f"crashtest: {self.log} lost its {START_MARK} mark (did logging stop?)")
            eps = epochs(entries, start)
            rng = random.Random(self.a["seed"])
            plan = [(ep, states(ep, self.a["states"], rng, first=(i == 0))) for i, ep in enumerate(eps)]
            total = sum(len(s) for _, s in plan)
            truncated = total > self.a["max_states"]
            _say(f"workload logged {len(entries)} entries; {len(eps)} epochs after {self.fs_done}, "
                 f"{total} crash states" + (f", checking the first {self.a['max_states']}" if truncated else ""))
            base = os.path.join(self.work, "base.img")
            with open(base, "wb") as f:
                f.truncate(self.size)
            fd = os.open(base, os.O_RDWR)
            try:
                for e in entries[:start + 1]:
                    apply_to_file(log, e, fd)
                result = self._check_all(log, fd, plan, min(total, self.a["max_states"]))
            finally:
                os.close(fd)
        result.update(seconds=round(time.monotonic() - t0, 1), epochs=len(eps), total_states=total,
                      truncated=truncated, log=self.log, fs=self.fs)
        if result["failed"]:
            self.keep_log = True
        self._print(result)
        return 1 if result["failed"] else 0

    def _check_all(self, log, base_fd, plan, limit) -> dict:
        done = failed = 0
        first = None
        slots = list(range(self.jobs))
        lock = threading.Lock()
        progress = Progress("crashtest", "state", limit)
        with ThreadPoolExecutor(self.jobs) as pool:
            for ep, sts in plan:
                sts = sts[:max(0, limit - done)]
                os.fsync(base_fd)

                def one(st):
                    with lock:
                        slot = slots.pop()
                    try:
                        return st, self._check_state(log, st, slot)
                    finally:
                        with lock:
                            slots.append(slot)
                for st, why in pool.map(one, sts):
                    done += 1
                    progress(done, f", {failed} failed")
                    if why:
                        failed += 1
                        if first is None:
                            first = (st, why)
                if (first and not self.a["keep_going"]) or done >= limit:
                    break
                # the next epoch starts from this one's point
                for e in ep.writes:
                    apply_to_file(log, e, base_fd)
        progress.done()
        out = {"states": done, "failed": failed, "first_failure": None}
        if first:
            out["first_failure"] = self._describe(log, *first)
        return out

    def _check_state(self, log, st, slot) -> str | None:
        img = os.path.join(self.work, f"state{slot}.img")
        mnt = os.path.join(self.work, f"mnt{slot}")
        os.makedirs(mnt, exist_ok=True)
        try:
            _copy_file(os.path.join(self.work, "base.img"), img, self.size)
            fd = os.open(img, os.O_RDWR)
            try:
                for pos in st.applied:
                    apply_to_file(log, st.epoch.writes[pos], fd)
                os.fsync(fd)
            finally:
                os.close(fd)
            return self._verdict(img, mnt, st)
        finally:
            if mnt in self.mounted:
                self._umount(mnt)
            try:
                os.unlink(img)
            except FileNotFoundError:
                pass

    def _verdict(self, img, mnt, st) -> str | None:
        env = dict(os.environ, UBLKSHELL_CRASH_EPOCH=str(st.epoch.number),
                   UBLKSHELL_CRASH_ENTRY=str(st.last_entry))
        if self.fstype:
            p = self._mount(img, mnt, self.a["mount_opts"], loop=True)
            if p.returncode:
                return f"mount failed (exit {p.returncode}): {_tail(p.stdout + p.stderr)}"
            if self.user_check:
                argv = [mnt if w == "{}" else w for w in self.user_check]
                p = subprocess.run(argv, cwd=mnt, env=dict(env, UBLKSHELL_MNT=mnt), stdin=subprocess.DEVNULL,
                                   capture_output=True)
                if p.returncode:
                    self._umount(mnt)
                    return f"--check exited {p.returncode}: {_tail(p.stdout + p.stderr)}"
            if self._umount(mnt):
                return "unmount failed"
            p = subprocess.run(self.fsck + [img], stdin=subprocess.DEVNULL, capture_output=True)
            if p.returncode:
                return f"{self.fsck[0]} exited {p.returncode}: {_tail(p.stdout + p.stderr)}"
            return None
        argv = [img if w == "{}" else w for w in self.user_check]
        p = subprocess.run(argv, cwd=self.work, env=dict(env, UBLKSHELL_IMAGE=img), stdin=subprocess.DEVNULL,
                           capture_output=True)
        return f"--check exited {p.returncode}: {_tail(p.stdout + p.stderr)}" if p.returncode else None

    def _describe(self, log, st, why) -> dict:
        applied = {st.epoch.writes[p].index for p in st.applied}
        writes = [{"entry": e.index, "flags": flag_names(e.flags).split("|"), "sector": e.sector,
                   "sectors": e.nr_sectors, "persisted": e.index in applied} for e in st.epoch.writes]
        skip = ",".join(map(str, st.skipped))
        rebuild = (f"ublkshell replay {shlex.quote(self.log)} NEW.img --size {self.size} "
                   f"--to-entry {st.last_entry}" + (f" --skip {skip}" if skip else ""))
        point = st.epoch.point
        return {"epoch": st.epoch.number, "point": point.index if point else None,
                "point_flags": flag_names(point.flags).split("|") if point else [],
                "kind": st.why, "why": why, "writes": writes, "rebuild": rebuild}

    def _print(self, r: dict) -> None:
        if self.a["json"]:
            print(json.dumps(r, sort_keys=True))
            return
        print(f"crashtest: {r['fs']}: {r['states']} crash states checked over {r['epochs']} epochs in "
              f"{r['seconds']} s: {r['failed']} failed" + ("" if not r["truncated"] else
                                                           f" ({r['total_states']} possible; --max-states)"))
        f = r["first_failure"]
        if not f:
            return
        at = (f"the point at entry {f['point']} ({'|'.join(f['point_flags'])})" if f["point"] is not None
              else "the log's unflushed end")
        print(f"first failure: epoch {f['epoch']}, before {at}: {KINDS[f['kind']]}:\n  {f['why']}")
        print("the epoch's writes (persisted in this state or lost):")
        for w in f["writes"][:50]:
            print(f"  {w['entry']:8d} {'|'.join(w['flags']):<14s} sector {w['sector']} +{w['sectors']}  "
                  f"{'persisted' if w['persisted'] else 'LOST'}")
        if len(f["writes"]) > 50:
            print(f"  ... and {len(f['writes']) - 50} more")
        print(f"rebuild it: {f['rebuild']}")

    def cleanup(self) -> None:
        for mnt in list(self.mounted):
            self._umount(mnt)
        try:
            self._delete()
        except UblkError as e:
            _say(str(e))
        for name in os.listdir(self.work):
            path = os.path.join(self.work, name)
            if path == self.log and self.keep_log:
                continue
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
        if self.keep_log and os.path.dirname(self.log) == self.work:
            _say(f"the log is kept: {self.log}")
        else:
            os.rmdir(self.work)


FICLONE = 0x40049409  # _IOW(0x94, 9, int)


def _copy_file(src: str, dst: str, size: int) -> None:
    """The base image: a reflink where the file system shares blocks (btrfs, xfs), else a copy
    made in the kernel (no bytes through Python)."""
    import fcntl

    with open(src, "rb") as s, open(dst, "wb") as d:
        try:
            fcntl.ioctl(d.fileno(), FICLONE, s.fileno())
            return
        except OSError:
            pass
        done = 0
        while done < size:
            n = os.copy_file_range(s.fileno(), d.fileno(), size - done)
            if n <= 0:
                break
            done += n
