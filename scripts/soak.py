#!/usr/bin/env python3
"""Soak ublkshell against the real ublk driver: long runs of what the VM tests do a few times.

    scripts/soak.sh [OPTIONS]            boots the bundled VM unless /dev/ublk-control exists
    python scripts/soak.py [OPTIONS]     here, as root, on a kernel with ublk_drv

Scenarios (all three by default; --only picks one):

  kill-recover   A mem device added with --recovery=reissue (--modes reissue,requeue adds a
                 second device, run in requeue mode). fio writes and verifies on it the whole
                 time (randwrite 4k, crc32c, io_uring, direct, iodepth 16, --verify_backlog,
                 --serialize_overlap=1), in rounds of --fio-loops passes over the device, each
                 round checked when it ends, so that every write is verified. Meanwhile the
                 device's daemon is SIGKILLed and a new one recovers the device --cycles times
                 (default 1000), each kill after fio has completed --writes-per-cycle more
                 writes (default 300). Checks: no verify error; in reissue mode no IO error and
                 every write read back and verified; in requeue mode only EIO, at most
                 iodepth per kill; every kill leaves the device QUIESCED; every recovery within
                 --max-recovery seconds; the device LIVE at the end; nothing left after `del`.
                 Figures: kill, recover and IO outage times (min/median/p99/max), the IO the dead
                 daemons were serving (abandoned), fio's writes and verified reads.

  hung-del       --rounds rounds (default 20) of: a mem device with a `hang` rule, dd or fio
                 (reads or writes, 1 or 2 queues, with or without --recovery, in turn) issuing
                 IO that the daemon withholds (`inflight` must show every tag hung), then
                 `ublkshell del ID`, which must return within --del-limit seconds (default 5).
                 The withheld IO must fail or complete and its process exit, and nothing may
                 be left: no /dev/ublkcN or /dev/ublkbN, no daemon, no registry entry, no
                 statistics or mem file.

  server-kill    A server (`ublkshell serve --socket S --mount M`) and two devices added
                 through it, fio verify running on one; --rounds times (default 10) the server
                 is SIGKILLed mid-IO (with a reader open on the stats tree and a trace stream
                 connected) and a new one started on the same socket and mount point. Checks:
                 fio keeps making progress while no server runs and ends every round without
                 an error; the devices and their daemons survive; the new server's tree at M
                 shows both devices with write counters still growing; `ublkshell -c "stats ID"`
                 works through the new socket; the killed server's tree reader does not hang.
                 At the end the server is stopped with SIGTERM: the devices must survive that
                 too (the server is crash-only; `serve --delete-devices` is the explicit choice).

Every blocking step has a timeout: a wedged device fails the run, it never hangs it. Whatever
the outcome, the run deletes its devices, stops its servers and fio, and unmounts its trees
(all under a private state directory, /dev/shm/ublkshell-soak-PID). It prints a results table
and a JSON summary (also written to --json FILE) and exits 1 if any check failed.
"""
import argparse
import errno
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

PY = sys.executable
MiB = 1 << 20
SCENARIOS = ("kill-recover", "hung-del", "server-kill")
EILSEQ = 84  # what fio reports for a verify failure


class Failure(Exception):
    """An expected way for a run to fail: reported in one line, never with a traceback."""


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} soak: {msg}", flush=True)


def one_line(text) -> str:
    return " ".join(str(text).split())


def last_line(text: str) -> str:
    lines = [l.strip() for l in (text or "").splitlines() if l.strip()]
    return lines[-1] if lines else ""


def pct(values, p):
    """The p-th percentile (nearest rank) of values."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100 * len(s) + 0.5)) - 1))
    return s[k]


def spread(values, digits=3) -> dict:
    if not values:
        return {"n": 0}
    r = lambda v: round(v, digits)  # noqa: E731
    return {"n": len(values), "min": r(min(values)), "median": r(statistics.median(values)),
            "p99": r(pct(values, 99)), "max": r(max(values)), "mean": r(statistics.fmean(values))}


def fmt_spread(s: dict, unit="s", digits=2) -> str:
    if not s.get("n"):
        return "-"
    f = lambda v: f"{v:.{digits}f}"  # noqa: E731
    return f"min {f(s['min'])} / median {f(s['median'])} / p99 {f(s['p99'])} / max {f(s['max'])} {unit}"


# -- processes: everything that can block runs with a deadline ------------------------------
class Procs:
    """Child processes the run started; whatever is left is killed at the end."""

    def __init__(self):
        self.live = []

    def popen(self, argv, **kw) -> subprocess.Popen:
        kw.setdefault("stdin", subprocess.DEVNULL)
        p = subprocess.Popen(argv, start_new_session=True, **kw)
        p.soak_argv = argv
        self.live.append(p)
        return p

    def reap(self, p: subprocess.Popen, timeout: float) -> bool:
        """Wait for p; False if it is still there after timeout (it is then left, not waited for)."""
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        if p in self.live:
            self.live.remove(p)
        return True

    def stop(self, p: subprocess.Popen, sig=signal.SIGKILL, timeout: float = 10) -> bool:
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)  # its own session: fio's job processes too
            except ProcessLookupError:
                pass
        # False: it cannot die yet (a process in uninterruptible IO waits for that IO to end)
        return self.reap(p, timeout)

    def wedged(self) -> list:
        return [f"pid {p.pid} ({' '.join(map(str, p.soak_argv))[:80]}) state {proc_state(p.pid)}"
                for p in self.live if p.poll() is None]

    def run(self, argv, timeout: float, env=None, cwd=None) -> subprocess.CompletedProcess:
        p = self.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(p)
            raise Failure(f"`{' '.join(map(str, argv))[:120]}` did not return within {timeout:g} s") from None
        self.reap(p, 0)
        return subprocess.CompletedProcess(argv, p.returncode, out, err)


PROCS = Procs()


def proc_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError):
        return "gone"


def cli(*args, timeout: float = 120, check: bool = True, socket_path=None) -> subprocess.CompletedProcess:
    argv = [PY, "-m", "ublkshell"] + (["--socket", socket_path] if socket_path else []) + [str(a) for a in args]
    p = PROCS.run(argv, timeout)
    if check and p.returncode:
        raise Failure(f"`ublkshell {' '.join(map(str, args))}` exited {p.returncode}: "
                      f"{last_line(p.stderr) or last_line(p.stdout)}")
    return p


def jcli(*args, timeout: float = 120):
    return json.loads(cli(*args, "--json", timeout=timeout).stdout)


def bounded(what: str, timeout: float, fn, *args, **kw):
    """fn(*args) in a worker thread: a call stuck in the kernel fails the run instead of hanging it."""
    box = {}

    def body():
        try:
            box["result"] = fn(*args, **kw)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    t = threading.Thread(target=body, daemon=True, name=what)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise Failure(f"{what} did not return within {timeout:g} s (wedged)")
    if "error" in box:
        e = box["error"]
        from ublkshell.errors import UblkError

        if isinstance(e, UblkError):
            raise Failure(f"{what}: {one_line(e)}") from None
        raise e
    return box.get("result")


def wait_for(what: str, timeout: float, cond, interval: float = 0.05, tick=None):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if tick:
            tick()
        if time.monotonic() > deadline:
            raise Failure(f"{what}: not within {timeout:g} s")
        time.sleep(interval)


def cat(path: str, timeout: float = 30) -> str:
    """A read of the stats tree, in a child: a wedged FUSE server fails the run, never hangs it."""
    p = PROCS.run(["cat", path], timeout)
    if p.returncode:
        raise Failure(f"reading {path}: {last_line(p.stderr)}")
    return p.stdout


# -- devices ----------------------------------------------------------------------------------
class Devices:
    """Devices the run added; whatever is left is deleted at the end."""

    def __init__(self):
        self.ids = set()

    def add(self, *args, timeout: float = 180) -> dict:
        dev = jcli("add", *args, timeout=timeout)
        self.ids.add(dev["id"])
        dev["path"] = f"/dev/ublkb{dev['id']}"
        return dev

    def adopt(self, dev: dict) -> dict:
        self.ids.add(dev["id"])
        dev["path"] = f"/dev/ublkb{dev['id']}"
        return dev

    def delete(self, dev_id: int, timeout: float = 60) -> float:
        t0 = time.monotonic()
        cli("del", dev_id, timeout=timeout)
        self.ids.discard(dev_id)
        return time.monotonic() - t0

    def cleanup(self) -> list:
        errors = []
        for dev_id in sorted(self.ids):
            if not os.path.exists(f"/dev/ublkc{dev_id}"):
                continue
            try:
                p = cli("del", dev_id, timeout=60, check=False)
                if p.returncode:
                    errors.append(f"del {dev_id}: {last_line(p.stderr)}")
            except Failure as e:
                errors.append(str(e))
        return errors


DEVICES = Devices()


def listed(dev_id: int):
    from ublkshell.devices.lifecycle import list_devices

    return next((d for d in bounded("list", 60, list_devices) if d["id"] == dev_id), None)


class WriteCounter:
    """A device's completed writes, read from its statistics file (which a recovery keeps)."""

    def __init__(self, dev_id: int):
        self.dev_id = dev_id
        self.shm = None
        self.ino = None

    def __call__(self) -> int:
        from ublkshell.devices import paths
        from ublkshell.observe import shm as shm_mod

        path = paths.stats_path(self.dev_id)
        try:
            ino = os.stat(path).st_ino
        except FileNotFoundError:
            raise Failure(f"device {self.dev_id}: its statistics file is gone") from None
        if ino != self.ino:
            self.shm, self.ino = shm_mod.open_device(self.dev_id), ino
        s = self.shm
        return sum(int(s.queue(q).ops[1].ios) for q in range(s.nr_queues))

    def errors(self) -> int:
        self()
        s = self.shm
        return sum(int(s.queue(q).ops[op].errors) for q in range(s.nr_queues) for op in range(6))


def leftovers(dev: dict) -> list:
    """What a deleted device left behind (empty: nothing)."""
    from ublkshell import procs
    from ublkshell.devices import registry

    i = dev["id"]
    left = [p for p in (f"/dev/ublkc{i}", f"/dev/ublkb{i}") if os.path.exists(p)]
    if procs.is_daemon(dev.get("pid"), dev.get("pid_start")):
        left.append(f"daemon pid {dev['pid']}")
    if registry.read(i) is not None:
        left.append("its registry entry")
    for key in ("stats", "mem_path"):
        if dev.get(key) and os.path.exists(dev[key]):
            left.append(dev[key])
    return left


def wait_no_leftovers(dev: dict, timeout: float = 5) -> list:
    deadline = time.monotonic() + timeout
    while True:
        left = leftovers(dev)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


# -- fio --------------------------------------------------------------------------------------
class FioRounds:
    """fio writing and verifying on a device, one round after another; each round is checked
    when it ends, so that every write of the run is read back and verified."""

    def __init__(self, label: str, path: str, workdir: str, *, size: str, loops: int, iodepth: int,
                 continue_on_eio: bool, need_every_write_verified: bool):
        self.label, self.path, self.workdir = label, path, workdir
        self.size, self.loops, self.iodepth = size, loops, iodepth
        self.continue_on_eio = continue_on_eio
        self.need_all = need_every_write_verified
        self.proc = None
        self.rounds = 0
        self.writes = 0
        self.verified = 0
        self.io_errors = 0
        self.error_codes = set()
        self.verify_errors = 0
        self.failed = None  # one line: why a round failed
        self.started_at = None
        self.round_seconds = []
        self.starts = []

    def argv(self) -> list:
        n = self.rounds + 1
        a = ["fio", f"--name={self.label}", f"--filename={self.path}", "--rw=randwrite", "--bs=4k",
             f"--size={self.size}", f"--loops={self.loops}", "--ioengine=io_uring", "--direct=1",
             f"--iodepth={self.iodepth}", "--verify=crc32c", "--do_verify=1", "--verify_backlog=256",
             "--serialize_overlap=1", "--verify_state_save=0", "--output-format=json",
             f"--output={self.workdir}/fio-{self.label}-{n}.json"]
        if self.continue_on_eio:
            # IO the dead daemon held fails and was never acknowledged: counted, not fatal
            a.append("--continue_on_error=io")
        return a

    def start(self) -> None:
        n = self.rounds + 1
        self.err_path = f"{self.workdir}/fio-{self.label}-{n}.err"
        with open(self.err_path, "wb") as err:
            self.proc = PROCS.popen(self.argv(), stdout=subprocess.DEVNULL, stderr=err, cwd=self.workdir)
        self.started_at = time.monotonic()
        self.starts.append(self.started_at)

    def restarted_within(self, t_from: float, t_to: float) -> bool:
        """Whether a new round started in [t_from, t_to] (no IO while fio itself starts)."""
        return any(t_from <= t <= t_to for t in self.starts[1:])

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tick(self) -> None:
        """Check a round that ended and start the next; Failure if the round failed."""
        if self.proc is None:
            self.start()
        elif self.proc.poll() is not None:
            self._finish_round()
            self.start()

    def finish(self, timeout: float) -> None:
        """Let the running round end (no new one), and check it."""
        if self.proc is None:
            return
        if not PROCS.reap(self.proc, timeout):
            PROCS.stop(self.proc)
            self.proc = None
            raise Failure(f"fio {self.label}: its last round did not end within {timeout:g} s")
        self._finish_round()

    def _finish_round(self) -> None:
        p, self.proc = self.proc, None
        PROCS.reap(p, 1)
        self.rounds += 1
        self.round_seconds.append(time.monotonic() - self.started_at)
        n = self.rounds
        with open(self.err_path, errors="replace") as f:
            err = f.read()
        try:
            with open(f"{self.workdir}/fio-{self.label}-{n}.json") as f:
                text = f.read()
            job = json.loads(text[text.index("{"):])["jobs"][0]
        except (OSError, ValueError, KeyError, IndexError):
            job = None
        where = f"fio {self.label} round {n}"
        if job is None:
            self.failed = f"{where}: exited {p.returncode} without a result: {last_line(err)}"
            raise Failure(self.failed)
        w, r = int(job["write"]["total_ios"]), int(job["read"]["total_ios"])
        errs, code = int(job.get("total_err", 0)), int(job.get("error", 0))
        self.writes += w
        self.verified += r
        self.io_errors += errs
        for c in (code, int(job.get("first_error", 0))):
            if c:
                self.error_codes.add(c)
        verify_msgs = [l.strip() for l in err.splitlines() if "verify" in l.lower()]
        if code == EILSEQ or verify_msgs:
            self.verify_errors += max(1, len([m for m in verify_msgs if m.startswith("verify")]))
            self.failed = f"{where}: verify error: {verify_msgs[0] if verify_msgs else 'EILSEQ'}"
            raise Failure(self.failed)
        if p.returncode != 0:
            self.failed = f"{where}: exited {p.returncode} (error {code}): {last_line(err)}"
            raise Failure(self.failed)
        allowed = {0, errno.EIO} if self.continue_on_eio else {0}
        if code not in allowed:
            self.failed = f"{where}: error {code} ({os.strerror(code)}): {last_line(err)}"
            raise Failure(self.failed)
        if self.need_all and (errs or r != w):
            self.failed = f"{where}: {w} writes, {r} verified, {errs} IO errors: not every write verified"
            raise Failure(self.failed)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            PROCS.stop(self.proc, timeout=2)

    def figures(self) -> dict:
        return {"rounds": self.rounds, "writes": self.writes, "verified": self.verified,
                "io_errors": self.io_errors, "error_codes": sorted(self.error_codes),
                "verify_errors": self.verify_errors,
                "round_seconds": spread(self.round_seconds, 1)}


# -- results ----------------------------------------------------------------------------------
class Results:
    def __init__(self):
        self.rows = []  # (scenario, check, ok, value)
        self.figures = {}

    def check(self, scenario: str, name: str, ok: bool, value="") -> bool:
        self.rows.append((scenario, name, bool(ok), str(value)))
        if not ok:
            log(f"{scenario}: CHECK FAILED: {name}: {value}")
        return bool(ok)

    @property
    def ok(self) -> bool:
        return all(ok for _, _, ok, _ in self.rows) and bool(self.rows)

    def table(self) -> str:
        w1 = max([len("SCENARIO")] + [len(r[0]) for r in self.rows])
        w2 = max([len("CHECK")] + [len(r[1]) for r in self.rows])
        lines = [f"{'SCENARIO':<{w1}}  {'CHECK':<{w2}}  {'RESULT':<6}  VALUE"]
        for sc, name, ok, value in self.rows:
            lines.append(f"{sc:<{w1}}  {name:<{w2}}  {'ok' if ok else 'FAIL':<6}  {value}")
        return "\n".join(lines)


# -- scenario 1: kill and recover under fio verify -------------------------------------------
def kill_recover(a, res: Results, root: str) -> None:
    figures = res.figures.setdefault("kill-recover", {})
    for mode in a.modes:
        sc = f"kill-recover/{mode}"
        f = figures[mode] = {}
        try:
            kill_recover_mode(a, res, root, mode, f)
        except Failure as e:
            res.check(sc, "completed", False, one_line(e))


def kill_recover_mode(a, res: Results, root: str, mode: str, fig: dict) -> None:
    from ublkshell.devices.recovery import kill, recover

    sc = f"kill-recover/{mode}"
    dev = DEVICES.add("-t", "mem", "--size", a.size, "-q", a.queues, f"--recovery={mode}")
    i = dev["id"]
    log(f"{sc}: dev {i} ({a.size}, {a.queues} queue(s)), {a.cycles} kill+recover cycles, "
        f"a kill every {a.writes_per_cycle} writes")
    fio = FioRounds(f"kr-{mode}", dev["path"], root, size=a.size, loops=a.fio_loops, iodepth=a.iodepth,
                    continue_on_eio=True, need_every_write_verified=(mode == "reissue"))
    writes = WriteCounter(i)
    kill_s, recover_s, cycle_s, outage_s, wall_s, abandoned, states = [], [], [], [], [], [], {}
    fig.update(device=i, cycles_planned=a.cycles, cycles=0)
    t_start = time.monotonic()
    t_cycles = None
    last_report = 0
    try:
        fio.start()
        for cycle in range(1, a.cycles + 1):
            c0 = time.monotonic()
            if a.time_limit and c0 - t_start > a.time_limit * 60:
                log(f"{sc}: --time-limit {a.time_limit:g} min reached after {cycle - 1} cycles: stopping there")
                fig["stopped_by_time_limit"] = True
                break
            # kill only once fio has written more since the last recovery: paced by IO, not time
            mark = writes()
            resumed = None
            deadline = time.monotonic() + a.io_timeout
            while True:
                w = writes()
                if resumed is None and w > mark:
                    resumed = time.monotonic()
                if w >= mark + a.writes_per_cycle:
                    break
                fio.tick()
                if time.monotonic() > deadline:
                    raise Failure(f"cycle {cycle}: fio completed {w - mark} writes in {a.io_timeout:g} s "
                                  f"(needs {a.writes_per_cycle}): IO stopped")
                time.sleep(0.02)
            if cycle > 1 and resumed is not None:
                outage_s.append(resumed - t_recovered_from)
            t0 = time.monotonic()
            k = bounded(f"cycle {cycle}: kill {i}", 90, kill, i)
            t1 = time.monotonic()
            states[k["state"]] = states.get(k["state"], 0) + 1
            if not k["daemon_gone"] or k["state"] != "QUIESCED":
                raise Failure(f"cycle {cycle}: kill left the device {k['state']}"
                              f"{'' if k['daemon_gone'] else ', daemon still there'}")
            rec = bounded(f"cycle {cycle}: recover {i}", 240, recover, i)
            t2 = time.monotonic()
            t_recovered_from = t0
            kill_s.append(t1 - t0)
            recover_s.append(t2 - t1)
            cycle_s.append(t2 - t0)
            abandoned.append(int(rec.get("abandoned") or 0))
            wall_s.append(t2 - c0)
            fig["cycles"] = cycle
            if rec.get("recoveries") != cycle:
                raise Failure(f"cycle {cycle}: the registry counts {rec.get('recoveries')} recoveries")
            if cycle == min(5, a.cycles) and a.cycles > 5:
                per = (time.monotonic() - t_start) / cycle
                log(f"{sc}: first {cycle} cycles took {per:.1f} s each: {a.cycles} cycles will take about "
                    f"{per * a.cycles / 60:.0f} min (1000 would take {per * 1000 / 3600:.1f} h)")
            if cycle - last_report >= a.progress or cycle == a.cycles:
                last_report = cycle
                el = time.monotonic() - t_start
                left = el / cycle * (a.cycles - cycle)
                log(f"{sc}: {cycle}/{a.cycles} cycles in {el / 60:.1f} min ({el / cycle:.1f} s/cycle, "
                    f"kill+recover median {statistics.median(cycle_s):.2f} s, max {max(cycle_s):.2f} s); "
                    f"{writes()} writes on the device; fio {fio.writes} writes / {fio.verified} verified in "
                    f"{fio.rounds} finished rounds, {fio.io_errors} IO errors; abandoned {sum(abandoned)}; "
                    f"ETA {left / 60:.0f} min")
        t_cycles = time.monotonic() - t_start
        # the device serves on: the running round ends, and with it every write is verified
        after = writes()
        wait_for(f"{sc}: IO after the last recovery", a.io_timeout, lambda: writes() > after, tick=fio.tick)
        fio.finish(a.io_timeout * 5)
    finally:
        fio.stop()
        elapsed = time.monotonic() - t_start
        cycling = t_cycles if t_cycles is not None else elapsed  # without fio's last round
        per = cycling / max(1, len(cycle_s))
        fig.update(seconds=round(elapsed, 1), cycling_seconds=round(cycling, 1),
                   seconds_per_cycle=round(per, 2), projected_1000_cycles_h=round(per * 1000 / 3600, 2),
                   kill_s=spread(kill_s), recover_s=spread(recover_s), kill_recover_s=spread(cycle_s),
                   io_outage_s=spread(outage_s), cycle_wall_s=spread(wall_s),
                   abandoned={"total": sum(abandoned), "max": max(abandoned, default=0),
                              "cycles_with_any": sum(1 for n in abandoned if n),
                              "histogram": {str(n): abandoned.count(n) for n in sorted(set(abandoned))}},
                   kill_states=states, fio=fio.figures())
    # the end: checks on what was measured
    n = len(cycle_s)
    res.check(sc, "cycles", n == a.cycles or (fig.get("stopped_by_time_limit") and n > 0),
              f"{n} of {a.cycles}" + (f" (--time-limit {a.time_limit:g} min)" if fig.get("stopped_by_time_limit")
                                      else "")
              + f" in {fig['cycling_seconds'] / 60:.1f} min, {fig['seconds_per_cycle']:.2f} s each: 1000 cycles "
                f"take {fig['projected_1000_cycles_h']:.1f} h")
    res.check(sc, "verify errors", fio.verify_errors == 0, fio.verify_errors)
    if mode == "reissue":
        res.check(sc, "IO errors", fio.io_errors == 0, f"{fio.io_errors} (codes {sorted(fio.error_codes) or '-'})")
        res.check(sc, "every write verified", fio.verified == fio.writes and fio.writes > 0,
                  f"{fio.writes} writes, {fio.verified} verified, {fio.rounds} fio rounds")
    else:
        limit = a.iodepth * n
        res.check(sc, "IO errors (EIO only, <= iodepth per kill)",
                  fio.error_codes <= {errno.EIO} and fio.io_errors <= limit,
                  f"{fio.io_errors} (codes {sorted(fio.error_codes) or '-'}, limit {limit})")
        res.check(sc, "writes verified", fio.verified > 0 and fio.verified + fio.io_errors >= fio.writes,
                  f"{fio.writes} writes, {fio.verified} verified, {fio.rounds} fio rounds")
    res.check(sc, "recovery time (kill+recover)", n and max(cycle_s) <= a.max_recovery,
              fmt_spread(fig["kill_recover_s"]) + f" (limit {a.max_recovery:g} s)")
    res.check(sc, "IO outage per cycle", True, fmt_spread(fig["io_outage_s"]))
    res.check(sc, "abandoned IO", True, f"{sum(abandoned)} in {fig['abandoned']['cycles_with_any']} cycles, "
                                        f"max {fig['abandoned']['max']} in one")
    d = listed(i)
    res.check(sc, "device alive at the end", d and d["state"] == "LIVE" and d["daemon_alive"],
              f"{d['state']}, daemon {d['pid']} {'alive' if d['daemon_alive'] else 'GONE'}" if d else "gone")
    errs = writes.errors()
    res.check(sc, "errors the daemons returned", errs == 0 or mode != "reissue", errs)
    fig["daemon_errors"] = errs
    dt = DEVICES.delete(i)
    left = wait_no_leftovers(dev)
    res.check(sc, "deleted, nothing left", not left, f"del {dt:.1f} s" + (f"; left: {', '.join(left)}" if left else ""))


# -- scenario 2: del of a device whose daemon withholds IO -------------------------------------
def issuer_argv(kind: str, op: str, path: str, iodepth: int) -> list:
    if kind == "dd":
        if op == "read":
            return ["dd", f"if={path}", "of=/dev/null", "bs=4k", "count=1", "iflag=direct", "status=none"]
        return ["dd", "if=/dev/zero", f"of={path}", "bs=4k", "count=1", "oflag=direct", "conv=notrunc",
                "status=none"]
    return ["fio", "--name=hung", f"--filename={path}", f"--rw=rand{op}", "--bs=4k", "--size=16M",
            "--ioengine=io_uring", "--direct=1", f"--iodepth={iodepth}", "--number_ios=64",
            "--norandommap", "--output-format=terse"]


def hung_del(a, res: Results, root: str) -> None:
    from ublkshell.verbs import call

    sc = "hung-del"
    fig = res.figures.setdefault(sc, {})
    del_s, del_parts, outcomes, rounds = [], {}, {}, []
    fig.update(rounds_planned=a.hung_rounds, rounds=0)
    failures = []
    log(f"{sc}: {a.hung_rounds} rounds; `del` must return within {a.del_limit:g} s")
    for r in range(a.hung_rounds):
        kind = ("dd", "fio")[r % 2]
        op = ("read", "write")[(r // 2) % 2]
        queues = 1 + (r // 4) % 2
        recovery = (r // 8) % 2 == 1
        what = f"{kind} {op}, {queues} queue(s){', --recovery=reissue' if recovery else ''}"
        depth = 1 if kind == "dd" else 16
        io = None
        try:
            args = ["-t", "mem", "--size", "32M", "-q", queues] + (["--recovery=reissue"] if recovery else [])
            dev = DEVICES.add(*args)
            i = dev["id"]
            bounded(f"hang rule on {i}", 60, call, "hang", {"id": i, "words": [f"op={op}"]})
            io = PROCS.popen(issuer_argv(kind, op, dev["path"], depth), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)

            def hung():
                if io.poll() is not None:
                    raise Failure(f"the {kind} {op} ended ({io.returncode}) instead of waiting: "
                                  f"{last_line(io.communicate()[1])}")
                tags = call("inflight", {"id": i})["tags"]
                held = [t for t in tags if (t.get("fault") or "").startswith("hang#")]
                return len(held) >= depth and len(held) == call("faults", {"id": i})["hung"] and held

            held = wait_for(f"round {r + 1}: {depth} hung tags in `inflight`", 60, hung, interval=0.1)
            watch = DelWatch(i)
            watch.start()
            t0 = time.monotonic()
            try:
                cli("del", i, timeout=60)
            finally:
                t_ret = time.monotonic()
                watch.halt.set()
                watch.join(5)
            dt = t_ret - t0
            DEVICES.ids.discard(i)
            del_s.append(dt)
            # where the time went: the CLI starting up until the daemon had the signal (it then
            # clears the rules), the daemon stopping until the device is gone, the CLI finishing
            parts = watch.parts(t0, t_ret)
            for k, v in parts.items():
                if v is not None:
                    del_parts.setdefault(k, []).append(v)
            try:
                out, err = io.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                PROCS.stop(io)
                raise Failure(f"round {r + 1}: the {kind} whose IO was withheld did not exit within 20 s of "
                              f"`del` (state {proc_state(io.pid)})") from None
            PROCS.reap(io, 1)
            outcome = "completed" if io.returncode == 0 else f"failed: {issuer_error(kind, out, err)}"
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            left = wait_no_leftovers(dev)
            ok = dt <= a.del_limit and not left
            rounds.append({"round": r + 1, "what": what, "hung": len(held), "del_s": round(dt, 2),
                           **{k: None if v is None else round(v, 2) for k, v in parts.items()},
                           "io": outcome, "left": left})
            log(f"{sc}: round {r + 1}/{a.hung_rounds} ({what}): {len(held)} tags hung, del {dt:.2f} s "
                f"({fmt_parts(parts)}), IO {outcome}" + (f"; LEFT: {', '.join(left)}" if left else ""))
            if not ok:
                failures.append(f"round {r + 1} ({what}): del {dt:.2f} s"
                                + (f", left {', '.join(left)}" if left else ""))
            fig["rounds"] = r + 1
        except Failure as e:
            failures.append(f"round {r + 1} ({what}): {one_line(e)}")
            log(f"{sc}: round {r + 1}: FAILED: {one_line(e)}")
            if io is not None:
                PROCS.stop(io)
            break  # a wedge is the finding: later rounds would pile up on it
    fig.update(del_s=spread(del_s), **{f"del_{k}": spread(v) for k, v in del_parts.items()},
               io_outcomes=outcomes, per_round=rounds)
    res.check(sc, "rounds", fig["rounds"] == a.hung_rounds and not failures,
              f"{fig['rounds']} of {a.hung_rounds}" + (f"; {failures[0]}" if failures else ""))
    res.check(sc, f"del returned within {a.del_limit:g} s", del_s and max(del_s) <= a.del_limit,
              fmt_spread(fig["del_s"]))
    for k, label in DelWatch.LABELS.items():
        if del_parts.get(k):
            res.check(sc, f"  of which {label}", True, fmt_spread(fig[f"del_{k}"]))
    res.check(sc, "withheld IO ended, its process exited", len(rounds) == fig["rounds"] and rounds,
              ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items())) or "-")
    res.check(sc, "nothing left behind", rounds and not any(x["left"] for x in rounds),
              "no /dev/ublkc*, daemon, registry entry or files" if rounds and not any(x["left"] for x in rounds)
              else "; ".join(f"round {x['round']}: {', '.join(x['left'])}" for x in rounds if x["left"]) or "-")


class DelWatch(threading.Thread):
    """Watches a device being deleted: when its daemon had the signal (it clears the fault
    rules first), and when the device was gone (/dev/ublkcN removed)."""
    LABELS = {"cli_until_signal_s": "CLI start until the daemon had SIGTERM",
              "daemon_stop_s": "daemon: SIGTERM until the device is gone",
              "cli_exit_s": "CLI: device gone until it returned"}

    def __init__(self, dev_id: int):
        super().__init__(daemon=True, name="delwatch")
        from ublkshell.observe import shm as shm_mod

        self.dev_id = dev_id
        self.shm = shm_mod.open_device(dev_id)  # the mapping outlives the file's removal
        self.halt = threading.Event()
        self.t_signal = self.t_gone = None

    def run(self):
        from ublkshell._native import ffi, lib

        while not self.halt.is_set():
            now = time.monotonic()
            if self.t_signal is None and lib.us_fault_list(self.shm.base, ffi.NULL, ffi.NULL, 0) == 0:
                self.t_signal = now
            if self.t_gone is None and not os.path.exists(f"/dev/ublkc{self.dev_id}"):
                self.t_gone = now
                return
            time.sleep(0.01)

    def parts(self, t0: float, t_ret: float) -> dict:
        ts, tg = self.t_signal, self.t_gone
        return {"cli_until_signal_s": None if ts is None else ts - t0,
                "daemon_stop_s": None if ts is None or tg is None else tg - ts,
                "cli_exit_s": None if tg is None else t_ret - tg}


def fmt_parts(parts: dict) -> str:
    names = {"cli_until_signal_s": "CLI start", "daemon_stop_s": "daemon stop", "cli_exit_s": "CLI exit"}
    return ", ".join(f"{names[k]} {v:.2f}" if v is not None else f"{names[k]} ?" for k, v in parts.items())


def issuer_error(kind: str, out: str, err: str) -> str:
    if kind == "fio":
        import re

        m = re.search(r"error=([^,\n]+)", err or "") or re.search(r"io_u error on file [^:]+: ([^:\n]+)", err or "")
        return m.group(1).strip() if m else (last_line(err) or "fio error")
    return (last_line(err).rsplit(": ", 1)[-1]) or "dd error"


# -- scenario 3: the server killed mid-IO ------------------------------------------------------
class Server:
    def __init__(self, root: str, n: int, sock: str, mnt: str):
        self.sock, self.mnt = sock, mnt
        self.log_path = os.path.join(root, f"server-{n}.log")
        with open(self.log_path, "wb") as logf:
            self.proc = PROCS.popen([PY, "-m", "ublkshell", "serve", "--socket", sock, "--mount", mnt],
                                    stdout=logf, stderr=subprocess.STDOUT, cwd="/")
        self.t0 = time.monotonic()

    def wait_up(self, timeout: float = 90, tick=None) -> float:
        from ublkshell.kernel.mounts import is_mounted

        def up():
            if self.proc.poll() is not None:
                raise Failure(f"the server exited ({self.proc.returncode}): {last_line(self.log())}")
            return is_mounted(self.mnt) and ping(self.sock) == self.proc.pid

        wait_for("the server coming up", timeout, up, interval=0.05, tick=tick)
        return time.monotonic() - self.t0

    def call(self, cmd: str, timeout: float = 120, **args):
        from ublkshell.bridge.client import Client
        from ublkshell.errors import UblkError

        try:
            with Client(self.sock, timeout=timeout) as c:
                return c.call(cmd, **args)
        except (UblkError, OSError) as e:
            raise Failure(f"server {cmd}: {one_line(e)}") from None

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""


def ping(sock: str):
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect(sock)
            s.sendall(b'{"id": 1, "cmd": "ping", "args": {}}\n')
            buf = b""
            while b"\n" not in buf:
                chunk = s.recv(4096)
                if not chunk:
                    return None
                buf += chunk
        finally:
            s.close()
        msg = json.loads(buf.split(b"\n", 1)[0])
        return msg.get("result", {}).get("pid") if msg.get("ok") else None
    except (OSError, ValueError):
        return None


class Sampler(threading.Thread):
    """Samples a write counter every 20 ms: when it moved, and the longest time it did not."""

    def __init__(self, counter: WriteCounter):
        super().__init__(daemon=True, name="sampler")
        self.counter = counter
        self.lock = threading.Lock()
        self.changes = []  # (monotonic time, count) whenever the count moved
        self.halt = threading.Event()
        self.error = None

    def run(self):
        last = None
        while not self.halt.is_set():
            try:
                n = self.counter()
            except Exception as e:  # noqa: BLE001
                self.error = one_line(e)
                return
            if n != last:
                with self.lock:
                    self.changes.append((time.monotonic(), n))
                last = n
            time.sleep(0.02)

    def count_at(self, t: float) -> int:
        with self.lock:
            before = [n for (ts, n) in self.changes if ts <= t]
        return before[-1] if before else 0

    def max_gap(self, t_from: float, t_to: float) -> float:
        """The longest stretch within [t_from, t_to] in which no write completed."""
        with self.lock:
            ts = [t for (t, _) in self.changes if t_from <= t <= t_to]
        points = [t_from] + ts + [t_to]
        return max(b - a for a, b in zip(points, points[1:]))


def server_kill(a, res: Results, root: str) -> None:
    from ublkshell.kernel.mounts import is_mounted

    sc = "server-kill"
    fig = res.figures.setdefault(sc, {})
    sock, mnt = os.path.join(root, "soak.sock"), os.path.join(root, "tree")
    servers, fio, sampler = [], None, None
    down_s, up_s, writes_while_down, gaps, gaps_no_restart = [], [], [], [], []
    failures = []
    fig.update(rounds_planned=a.server_rounds, rounds=0)
    log(f"{sc}: {a.server_rounds} rounds: SIGKILL the server mid-IO, start a new one")
    try:
        srv = Server(root, 0, sock, mnt)
        servers.append(srv)
        srv.wait_up()
        # one device written and verified the whole time, one idle with --recovery
        busy = DEVICES.adopt(srv.call("add", target="mem", size="32M", queues=2, timeout=180))
        idle = DEVICES.adopt(srv.call("add", target="mem", size="16M", recovery="reissue", timeout=180))
        pids = {busy["id"]: busy["pid"], idle["id"]: idle["pid"]}
        fio = FioRounds("server", busy["path"], root, size="32M", loops=4, iodepth=a.iodepth,
                        continue_on_eio=False, need_every_write_verified=True)
        writes = WriteCounter(busy["id"])
        sampler = Sampler(WriteCounter(busy["id"]))
        sampler.start()
        fio.start()
        t_begin = time.monotonic()
        for r in range(1, a.server_rounds + 1):
            # mid-IO: fio has been writing since the last round
            mark = writes()
            wait_for(f"round {r}: fio writing", a.io_timeout, lambda: writes() >= mark + a.writes_per_cycle,
                     tick=fio.tick)
            # a reader blocked on the tree and a trace stream through the socket, both cut by the kill
            stem = f"ublkb{busy['id']}"
            tree_reader = PROCS.popen(["cat", os.path.join(mnt, stem, "trace")], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE)
            tracer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            tracer.settimeout(30)
            try:
                tracer.connect(sock)
                tracer.sendall(json.dumps({"id": 7, "cmd": "trace", "args": {"id": busy["id"]}}).encode() + b"\n")
                if b'"started"' not in tracer.recv(65536):
                    raise Failure(f"round {r}: the trace stream did not start")
            except OSError as e:
                tracer.close()
                raise Failure(f"round {r}: a trace stream through the socket: {e}") from None
            time.sleep(0.3)
            old = servers[-1]
            t_kill = time.monotonic()
            os.kill(old.proc.pid, signal.SIGKILL)
            if not PROCS.reap(old.proc, 10):
                raise Failure(f"round {r}: the SIGKILLed server (pid {old.proc.pid}) did not die in 10 s")
            # what the killed server served fails fast, it never hangs
            try:
                tree_reader.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                PROCS.stop(tree_reader)
                raise Failure(f"round {r}: a reader of the dead server's tree still blocks 15 s after the kill") \
                    from None
            PROCS.reap(tree_reader, 1)
            try:
                tail = tracer.recv(65536)
                while tail:
                    tail = tracer.recv(65536)
            except OSError as e:
                if not isinstance(e, ConnectionResetError):
                    raise Failure(f"round {r}: the trace stream of the dead server: {e}") from None
            finally:
                tracer.close()
            # the devices belong to their daemons: untouched by the server's death
            for dev_id, pid in pids.items():
                from ublkshell import procs

                if not os.path.exists(f"/dev/ublkc{dev_id}") or not procs.alive(pid):
                    raise Failure(f"round {r}: device {dev_id} or its daemon {pid} went with the server")
            new = Server(root, r, sock, mnt)
            servers.append(new)
            up = new.wait_up(tick=fio.tick)
            t_up = time.monotonic()
            down_s.append(t_up - t_kill)
            up_s.append(up)
            moved = sampler.count_at(t_up) - sampler.count_at(t_kill)
            writes_while_down.append(moved)
            gaps.append(sampler.max_gap(t_kill, t_up))
            restarted = fio.restarted_within(t_kill - 1, t_up)
            if not restarted:
                gaps_no_restart.append(gaps[-1])
            if moved <= 0:
                failures.append(f"round {r}: no write completed in the {t_up - t_kill:.1f} s without a server")
            # the new server's tree: both devices, counters still growing
            stats_path = os.path.join(mnt, stem, "stats.json")
            first = json.loads(wait_for(f"round {r}: {stem} in the new server's tree", 30,
                                        lambda: os.path.exists(stats_path) and cat(stats_path)))
            w0 = first["ops"]["write"]["ios"]
            time.sleep(0.5)
            w1 = wait_for(f"round {r}: write counter in the tree growing", a.io_timeout,
                          lambda: (json.loads(cat(stats_path))["ops"]["write"]["ios"] > w0
                                   and json.loads(cat(stats_path))["ops"]["write"]["ios"]), tick=fio.tick)
            if not os.path.isdir(os.path.join(mnt, f"ublkb{idle['id']}")):
                failures.append(f"round {r}: ublkb{idle['id']} is missing from the new server's tree")
            # the shell line through the new socket
            out = cli("-c", f"stats {busy['id']}", socket_path=sock, timeout=120).stdout
            if "write" not in out:
                failures.append(f"round {r}: `stats {busy['id']}` through the new socket: {out.strip()[:100]!r}")
            listed_ids = {d["id"]: d for d in new.call("list")}
            for dev_id, pid in pids.items():
                d = listed_ids.get(dev_id)
                if not d or d["state"] != "LIVE" or not d["daemon_alive"] or d["pid"] != pid:
                    failures.append(f"round {r}: the new server lists device {dev_id} as {d and d['state']}")
            log(f"{sc}: round {r}/{a.server_rounds}: server down {t_up - t_kill:.1f} s (new one up in "
                f"{up:.1f} s), {moved} writes meanwhile, longest write stall {gaps[-1]:.2f} s"
                f"{' (fio started a new round meanwhile)' if restarted else ''}; tree {w0} -> {w1} "
                f"writes; fio {fio.writes} writes / {fio.verified} verified so far")
            fig["rounds"] = r
        fio.finish(a.io_timeout * 5)
        total_gap = sampler.max_gap(t_begin, time.monotonic())
        # a clean stop (SIGTERM) of a crash-only server leaves the devices running
        last = servers[-1]
        last.proc.send_signal(signal.SIGTERM)
        stopped = PROCS.reap(last.proc, 60)
        survived = all(os.path.exists(f"/dev/ublkc{d}") for d in pids)
        res.check(sc, "SIGTERM: server stops, devices stay", stopped and last.proc.returncode == 0 and survived
                  and not is_mounted(mnt),
                  f"exit {last.proc.returncode if stopped else 'none in 60 s'}, "
                  f"devices {'still there' if survived else 'DELETED'}, "
                  f"tree {'still mounted' if is_mounted(mnt) else 'unmounted'}")
        fig["max_write_stall_s_whole_run"] = round(total_gap, 2)
    except Failure as e:
        failures.append(one_line(e))
    finally:
        if sampler is not None:
            sampler.halt.set()
        if fio is not None:
            fio.stop()
        for s in servers:
            if s.proc.poll() is None:
                PROCS.stop(s.proc, signal.SIGTERM, 30) or PROCS.stop(s.proc)
        logs = "".join(s.log() for s in servers)
        fig.update(server_down_s=spread(down_s), new_server_up_s=spread(up_s),
                   writes_while_no_server=spread(writes_while_down, 0), write_stall_while_down_s=spread(gaps),
                   write_stall_while_down_no_fio_restart_s=spread(gaps_no_restart),
                   fio=fio.figures() if fio else None, servers_started=len(servers))
        for marker in ("Traceback", "internal error", "restarting it"):
            if marker in logs:
                failures.append(f"a server log says {marker!r}")
    if sampler is not None and sampler.error:
        failures.append(f"write counter: {sampler.error}")
    res.check(sc, "rounds", fig["rounds"] == a.server_rounds and not failures,
              f"{fig['rounds']} of {a.server_rounds}" + (f"; {failures[0]}" if failures else ""))
    if fio is not None:
        res.check(sc, "fio: no error, every write verified",
                  fio.failed is None and fio.io_errors == 0 and fio.verify_errors == 0 and fio.writes == fio.verified
                  and fio.writes > 0,
                  fio.failed or f"{fio.writes} writes, {fio.verified} verified, {fio.rounds} rounds")
    res.check(sc, "IO went on without a server", writes_while_down and min(writes_while_down) > 0,
              f"writes while down: {fmt_spread(fig['writes_while_no_server'], 'writes', 0)}; "
              f"longest stall {max(gaps, default=0):.2f} s, "
              f"{max(gaps_no_restart, default=0):.2f} s in rounds without a fio restart")
    res.check(sc, "new server up (socket + tree)", up_s and len(up_s) == fig["rounds"],
              fmt_spread(fig["new_server_up_s"]))
    for dev_id in sorted(DEVICES.ids):
        if os.path.exists(f"/dev/ublkc{dev_id}"):
            DEVICES.delete(dev_id)


# -- the run ------------------------------------------------------------------------------------
def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", metavar="SCENARIO[,SCENARIO]",
                    help="run only these: kill-recover, hung-del, server-kill (default: all three)")
    g = ap.add_argument_group("kill-recover")
    g.add_argument("--cycles", type=int, default=1000, help="kill+recover cycles per mode (default %(default)s)")
    g.add_argument("--modes", default="reissue",
                   help="recovery modes, comma-separated: reissue, requeue (default %(default)s)")
    g.add_argument("--writes-per-cycle", type=int, default=300,
                   help="fio writes between two kills, also between server kills (default %(default)s)")
    g.add_argument("--size", default="16M", help="the device and fio's file size (default %(default)s)")
    g.add_argument("--queues", type=int, default=1, help="the device's queues (default %(default)s)")
    g.add_argument("--fio-loops", type=int, default=8,
                   help="passes over the device per fio round; a round's writes are all verified when it "
                        "ends (default %(default)s)")
    g.add_argument("--iodepth", type=int, default=16, help="fio's iodepth (default %(default)s)")
    g.add_argument("--max-recovery", type=float, default=30,
                   help="longest acceptable kill+recover, in seconds (default %(default)s)")
    g.add_argument("--time-limit", type=float, metavar="MIN",
                   help="stop cycling after MIN minutes even if fewer than --cycles were done (the checks "
                        "then judge the cycles that ran); default: no limit")
    g.add_argument("--progress", type=int, default=25, help="print progress every N cycles (default %(default)s)")
    g = ap.add_argument_group("hung-del and server-kill")
    g.add_argument("--rounds", type=int, help="rounds of hung-del (default 20) and of server-kill (default 10)")
    g.add_argument("--hung-del-rounds", type=int, help="rounds of hung-del alone")
    g.add_argument("--server-kill-rounds", type=int, help="rounds of server-kill alone")
    g.add_argument("--del-limit", type=float, default=5, help="hung-del: how long `del` may take (default 5 s)")
    g = ap.add_argument_group("all")
    g.add_argument("--io-timeout", type=float, default=120,
                   help="how long IO may make no progress before the run fails (default %(default)s s)")
    g.add_argument("--json", metavar="FILE", help="also write the summary as JSON to FILE")
    a = ap.parse_args(argv)
    a.scenarios = list(SCENARIOS)
    if a.only is not None:
        a.scenarios = [x.strip() for x in a.only.split(",") if x.strip()]
        bad = [x for x in a.scenarios if x not in SCENARIOS]
        if bad or not a.scenarios:
            ap.error(f"--only: {', '.join(bad) or 'nothing given'}: choose from {', '.join(SCENARIOS)}")
    a.modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    bad = [m for m in a.modes if m not in ("reissue", "requeue")]
    if bad or not a.modes:
        ap.error(f"--modes: {', '.join(bad) or 'none given'}: choose from reissue, requeue")
    a.hung_rounds = a.hung_del_rounds if a.hung_del_rounds is not None else (a.rounds if a.rounds is not None else 20)
    a.server_rounds = (a.server_kill_rounds if a.server_kill_rounds is not None
                       else (a.rounds if a.rounds is not None else 10))
    for name in ("cycles", "writes_per_cycle", "queues", "fio_loops", "iodepth", "progress", "hung_rounds",
                 "server_rounds"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    return a


def preflight() -> None:
    if os.geteuid() != 0:
        raise Failure("run as root (ublk control, mounts and /dev nodes need it)")
    if not os.path.exists("/dev/ublk-control"):
        raise Failure("/dev/ublk-control is missing: this kernel has no ublk_drv (scripts/soak.sh boots the VM)")
    for tool in ("fio", "dd", "cat"):
        if not shutil.which(tool):
            raise Failure(f"{tool} is not installed")


def stray_processes(state_dir: str) -> list:
    """Processes other than this one started with this run's state directory."""
    mark = f"UBLKSHELL_STATE_DIR={state_dir}".encode()
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if mark in env and proc_state(int(pid)) not in ("Z", "X", "gone"):
            out.append(f"{pid} ({cmd[:60]})")
    return out


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        preflight()
    except Failure as e:
        print(f"soak: {e}", file=sys.stderr)
        return 2
    root = f"/dev/shm/ublkshell-soak-{os.getpid()}"
    os.makedirs(root, mode=0o700)
    state = os.path.join(root, "state")
    # a private state directory: no other server or registry sees (or auto-recovers) our devices
    os.environ["UBLKSHELL_STATE_DIR"] = state
    os.environ.pop("UBLKSHELL_DATA_DIR", None)

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    res = Results()
    chosen = [x for x in SCENARIOS if x in a.scenarios]
    t0 = time.time()
    log(f"kernel {os.uname().release}, {os.cpu_count()} CPUs; scenarios: {', '.join(chosen)}; state in {state}")
    interrupted = False
    try:
        for name in chosen:
            s0 = time.monotonic()
            try:
                {"kill-recover": kill_recover, "hung-del": hung_del, "server-kill": server_kill}[name](a, res, root)
            except Failure as e:
                res.check(name, "completed", False, one_line(e))
            except Exception as e:  # a bug (here or in ublkshell): the traceback helps
                import traceback

                traceback.print_exc()
                res.check(name, "completed", False, f"unexpected {type(e).__name__}: {one_line(e)}")
            res.figures.setdefault(name, {})["scenario_seconds"] = round(time.monotonic() - s0, 1)
    except KeyboardInterrupt:
        interrupted = True
        res.check("run", "not interrupted", False, "interrupted (SIGINT/SIGTERM): cleaning up")
    finally:
        # leave nothing behind, whatever happened: fio and dd, servers, devices, trees
        for p in list(PROCS.live):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        errors = DEVICES.cleanup()
        for p in list(PROCS.live):
            PROCS.stop(p, timeout=15)
        tree = os.path.join(root, "tree")
        from ublkshell.kernel.mounts import is_mounted

        for _ in range(4):
            if not is_mounted(tree):
                break
            subprocess.run(["umount", "-l", tree], capture_output=True, timeout=30)
        left_devs = [f"/dev/ublkc{i}" for i in sorted(DEVICES.ids) if os.path.exists(f"/dev/ublkc{i}")]
        stray = stray_processes(state)
        wedged = PROCS.wedged()
        res.check("run", "cleanup: nothing left", not (errors or left_devs or stray or wedged
                                                       or is_mounted(tree)),
                  "; ".join(errors + left_devs + [f"process {s}" for s in stray]
                            + [f"wedged {w}" for w in wedged]
                            + (["tree still mounted"] if is_mounted(tree) else [])) or "devices, servers, fio, tree")
        keep_logs = not res.ok
        if keep_logs:
            dest = f"/tmp/ublkshell-soak-logs-{time.strftime('%Y%m%d-%H%M%S')}"
            try:
                shutil.copytree(root, dest, ignore=shutil.ignore_patterns("*.sock", "tree", "data", "*.mem",
                                                                          "*.stats"),
                                dirs_exist_ok=True, ignore_dangling_symlinks=True)
                log(f"logs (servers, daemons, fio) kept in {dest}")
            except (OSError, shutil.Error) as e:
                log(f"keeping the logs in {dest}: {one_line(e)}")
        if not stray and not left_devs:
            shutil.rmtree(root, ignore_errors=True)
    summary = {"ok": res.ok, "kernel": os.uname().release, "cpus": os.cpu_count(),
               "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t0)),
               "seconds": round(time.time() - t0, 1), "interrupted": interrupted,
               "options": {k: v for k, v in vars(a).items() if k != "json"},
               "checks": [{"scenario": s, "check": c, "ok": ok, "value": v} for s, c, ok, v in res.rows],
               "figures": res.figures}
    print()
    print(res.table())
    print()
    print(json.dumps(summary, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary, f, indent=1)
            f.write("\n")
    print(f"\nsoak: {'PASS' if res.ok else 'FAIL'} in {summary['seconds'] / 60:.1f} min", flush=True)
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
