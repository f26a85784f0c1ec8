#!/usr/bin/env python3
"""docs/examples/: one file per verb with its real output, in the style of bcc's tools/*_example.txt.

Creates FUSE-transport devices with loop devices on them (no ublk_drv needed), runs the real
command line against them with real IO (dd, fio) and real readers (blkparse, btt), and writes
docs/examples/VERB_example.txt and docs/examples/README.md. Needs root, /dev/fuse, losetup, fio
and blktrace (scripts/setup.sh installs them). About 30 s.

    scripts/examples.py                 regenerate docs/examples
    scripts/examples.py --out DIR       write the files to DIR instead
    scripts/examples.py --check [DIR]   generate into a temporary directory and compare with DIR
                                        (default docs/examples) after masking what varies from run
                                        to run; exit 1 with a diff if a format changed

The devices live in a private registry (UBLKSHELL_STATE_DIR under /run/ublkshell-examples), so
`list` and `metrics` show only this script's devices, and nothing here touches devices others
made; its paths are shown as the defaults a user sees (/run/ublkshell, /var/tmp). Everything it
creates is deleted on the way out, also on SIGINT, SIGTERM and SIGHUP; a run that was SIGKILLed
is cleaned up by the next one. tests/test_examples.py runs it and compares.
"""
import argparse
import contextlib
import difflib
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "docs" / "examples"
BASE = Path("/run/ublkshell-examples")
LOCK = Path("/run/ublkshell-examples.lock")
STATE, DATA, TMP = BASE / "state", BASE / "data", BASE / "tmp"
# what a reader would see with the default directories, longest first
SHOWN_PATHS = ((str(STATE), "/run/ublkshell"), (str(DATA), "/run/ublkshell/data"), (str(TMP), "/var/tmp"),
               (str(BASE), "/var/tmp"))
DEV, PC_DEV = 90, 91  # the fuse9x numbers are kept free for this script and its test
# sectors 65536.. (32 MiB into the 64 MiB device): far from what blkid probes (the first MiB and
# the end), so a udev probe after a write cannot show up in the IO these examples filter for
MID = 65536
ID = re.compile(r"fuse\d+|\d+")  # a device's name, as `del` takes it
WIDTH = 79
FOOTER = "This file is made by scripts/examples.py: change the script, not the file."
REGEN = "run scripts/examples.py to regenerate docs/examples (then read the diff and commit it)"


def python() -> str:
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


class Interrupted(BaseException):
    """SIGINT, SIGTERM or SIGHUP: unwind through every finally, so the devices go."""


def _interrupted(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def shown(text: str) -> str:
    for real, seen in SHOWN_PATHS:
        text = text.replace(real, seen)
    return text


# -- masking: what may differ between two honest runs --------------------------------------------
_UNIT = r"(?:ns|us|µs|ms|s|B|K|M|G|T|KiB|MiB|GiB|TiB|kB|MB|GB|TB|k|%)"
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*(?:[eE][-+]?\d+)?(?:\s?" + _UNIT + r")?(?![A-Za-z0-9_])")
_BAR = re.compile(r"(?<=\s)#+\s*$")
_STATUS = re.compile(r"^\(exit status -?\d+\)$|^\(killed after \d+ s\)$")


def mask(line: str) -> str:
    """One line with every number (and the unit printed with it: 12.1us, 40K, 7.3 MB/s) made N,
    histogram bars made one #, and runs of whitespace made one space. Exit statuses stay."""
    if _STATUS.match(line):
        return line
    line = _BAR.sub("#", line)
    line = _NUMBER.sub("N", line)
    return " ".join(line.split())


def normalize(text: str) -> list:
    """The masked lines, with runs of equal ones made one: histograms, traces and interval rows
    have as many rows as the run gave, and the same shape."""
    out = []
    for line in text.splitlines():
        m = mask(line)
        if not out or out[-1] != m:
            out.append(m)
    return out


def compare(expected: Path, actual: Path) -> list:
    """Problems between a committed docs/examples and a fresh one, each with a readable diff."""
    problems = []
    want = sorted(p.name for p in expected.iterdir() if p.is_file())
    got = sorted(p.name for p in actual.iterdir() if p.is_file())
    for name in sorted(set(want) - set(got)):
        problems.append(f"{name}: committed, but the generator no longer makes it")
    for name in sorted(set(got) - set(want)):
        problems.append(f"{name}: the generator makes it, but it is not committed")
    for name in sorted(set(want) & set(got)):
        a = normalize((expected / name).read_text())
        b = normalize((actual / name).read_text())
        if a != b:
            diff = difflib.unified_diff(a, b, f"docs/examples/{name} (committed, masked)",
                                        f"{name} (generated now, masked)", lineterm="", n=2)
            problems.append("\n".join(diff))
    return problems


# -- running things -------------------------------------------------------------------------------
class Result:
    def __init__(self, rc, out: str, timeout: float = 0):
        self.rc, self.out, self.timed_out = rc, out, timeout

    def shown(self) -> str:
        lines = shown(self.out.rstrip("\n")).splitlines()
        if self.timed_out:
            lines.append(f"(killed after {self.timed_out:.0f} s)")
        elif self.rc:
            lines.append(f"(exit status {self.rc})")
        return "\n".join(lines)


class Runner:
    """Runs commands as lists (no shell), output and errors in one stream as a terminal shows
    them, and remembers what is still running so that cleanup can stop it."""

    def __init__(self):
        self.procs = []
        self.env = dict(os.environ, UBLKSHELL_STATE_DIR=str(STATE), UBLKSHELL_DATA_DIR=str(DATA),
                        PYTHONUNBUFFERED="1", LC_ALL="C.UTF-8", LANG="C.UTF-8", NO_COLOR="1", TERM="dumb",
                        COLUMNS="100")
        self.env.pop("UBLKSHELL_SOCKET", None)
        self.env.pop("UBLKSHELL_DEBUG", None)

    def start(self, argv, cwd="/", quiet=False) -> subprocess.Popen:
        p = subprocess.Popen(argv, cwd=cwd, env=self.env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL if quiet else subprocess.PIPE,
                             stderr=subprocess.DEVNULL if quiet else subprocess.STDOUT,
                             text=True, errors="replace")
        self.procs.append(p)
        return p

    def finish(self, p: subprocess.Popen, timeout: float = 30, stop: bool = False) -> Result:
        """Wait for p (after SIGTERM if stop), killing it after timeout; its output so far either way."""
        if stop and p.poll() is None:
            p.terminate()
        try:
            out, _ = p.communicate(timeout=timeout)
            r = Result(p.returncode, out or "")
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
            r = Result(p.returncode, out or "", timeout)
        self.procs.remove(p)
        return r

    def run(self, argv, cwd="/", timeout: float = 30) -> Result:
        return self.finish(self.start(argv, cwd), timeout)

    def u(self, *args, timeout: float = 30) -> Result:
        return self.run([python(), "-m", "ublkshell", *args], timeout=timeout)

    def stop_all(self) -> None:
        for p in list(self.procs):
            with contextlib.suppress(Exception):
                self.finish(p, timeout=5, stop=True)

    def settle(self) -> None:
        """Let udev finish probing (it reads a block device after a writer closes it)."""
        if shutil.which("udevadm") and os.path.exists("/run/udev/control"):
            with contextlib.suppress(Exception):
                subprocess.run(["udevadm", "settle", "--timeout=10"], timeout=15, capture_output=True)


# -- the example files ----------------------------------------------------------------------------
def wrap(text: str) -> str:
    return "\n\n".join(textwrap.fill(" ".join(p.split()), WIDTH) for p in text.strip().split("\n\n"))


class Example:
    def __init__(self, verb: str, summary: str, intro: str):
        self.verb, self.summary = verb, summary
        self.parts = [f"Demonstrations of ublkshell {verb}.", wrap(intro)]

    def say(self, text: str) -> None:
        self.parts.append(wrap(text))

    def show(self, argv, result: Result = None, pipe: str = "", background: bool = False, head: int = 0,
             first: str = ""):
        """A command as typed (argv[0] ublkshell for ours), and what it printed (first: what a
        command left running printed before the next one)."""
        line = "# " + shown(shlex.join(argv)) + (f" | {pipe}" if pipe else "") + (" &" if background else "")
        if result is None:
            self.parts.append(line + ("\n" + shown(first.rstrip("\n")) if first.strip() else ""))
            return
        text = result.shown()
        if head:
            lines = text.splitlines()
            text = "\n".join(lines[:head] + [ln for ln in lines[head:] if _STATUS.match(ln)])
        self.parts.append(line + ("\n" + text if text else ""))

    def render(self) -> str:
        return "\n\n".join([*self.parts, FOOTER]) + "\n"


class Session:
    def __init__(self, r: Runner):
        self.r = r
        self.examples = {}

    def ex(self, verb, summary, intro) -> Example:
        self.examples[verb] = e = Example(verb, summary, intro)
        return e

    def u(self, e: Example, *args, **kw) -> Result:
        """Run `ublkshell ARGS` and show it in e."""
        res = self.r.u(*args, **kw)
        e.show(["ublkshell", *args], res)
        return res

    def cmd(self, e: Example, argv, cwd="/", head: int = 0, pipe: str = "", timeout: float = 30) -> Result:
        res = self.r.run(argv, cwd=cwd, timeout=timeout)
        e.show(argv, res, pipe=pipe, head=head)
        return res

    def loop_of(self, name: str, added: Result) -> str:
        """The loop device `add` printed, else the one `list --json` names (whatever its layout)."""
        m = re.search(r"(/dev/loop\d+)", added.out)
        if m:
            return m.group(1)
        res = self.r.u("list", "--json")
        for d in devices_in(res.out):
            if d.get("name") == name and isinstance(d.get("loop"), str):
                return d["loop"]
        raise SystemExit(f"examples: no loop device for {name} in `add` or `list --json`:\n{added.out}{res.out}")


def devices_in(text: str) -> list:
    """Every object with a "name" in a JSON answer, however it nests them (a list, {"devices": ...})."""
    try:
        todo = [json.loads(text)]
    except ValueError:
        return []
    found = []
    while todo:
        x = todo.pop()
        if isinstance(x, dict):
            if isinstance(x.get("name"), str):
                found.append(x)
            todo += list(x.values())
        elif isinstance(x, list):
            todo += x
    return found


def fio_load(loop: str, rw: str, extra=()) -> list:
    return ["fio", f"--name={rw}", f"--filename={loop}", f"--rw={rw}", "--bs=4k", "--direct=1",
            "--ioengine=psync", "--size=32M", "--time_based", "--runtime=60", *extra, "--output=/dev/null"]


def dd_read(loop: str, block: int, count: int = 1) -> list:
    return ["dd", f"if={loop}", "of=/dev/null", "bs=4k", f"count={count}", f"skip={block}", "iflag=direct"]


def dd_write(loop: str, block: int, count: int = 1, src: str = "/dev/zero", extra=()) -> list:
    return ["dd", f"if={src}", f"of={loop}", "bs=4k", f"count={count}", f"seek={block}", "oflag=direct", *extra]


def has_verb(r: Runner, verb: str) -> bool:
    """Whether this tree's command line has VERB (info and top became CLI verbs late)."""
    return r.u(verb, "--help").rc == 0


def generate(s: Session) -> None:
    r = s.r
    dev, pc = f"fuse{DEV}", f"fuse{PC_DEV}"
    mid_block = MID // 8  # 4 KiB blocks: dd's seek= and skip=

    # -- add ------------------------------------------------------------------------------------
    e = s.ex("add", "create a device: here a FUSE-transport mem device with a loop device on it", """
        add creates a block device and starts the IO daemon that serves it; the command returns
        once the device is ready, and the daemon keeps running without it. On a kernel with
        ublk_drv that is /dev/ublkbN. On one without (as where these examples were made),
        --transport fuse serves the same targets as a file in a FUSE mount, and --loop attaches
        that file to a loop device, so there is a block device to run dd, fio or mkfs on.""")
    added = s.u(e, "add", "--transport", "fuse", "-t", "mem", "--size", "64M", "--loop", "-n", str(DEV))
    if added.rc:
        raise SystemExit(f"examples: add failed:\n{added.out}")
    e.say(f"""The device's id is {dev} (-n {DEV} asked for that number; without -n the first free
        one is taken). The mem target keeps its data in a sparse file in RAM, so it costs nothing
        until written. Every other verb takes the id; the loop device is where the IO goes in.""")
    s.u(e, "add", "--transport", "fuse", "-t", "null", "--size", "1G", "-n", str(DEV))
    e.say("""A number that is taken is refused with the reason, and nothing is created.""")
    loop = s.loop_of(dev, added)
    r.settle()

    # -- list -----------------------------------------------------------------------------------
    e = s.ex("list", "what devices exist, their state, size, queues, daemon and loop device", """
        list shows every device: ublk ones first (from the kernel), then FUSE-transport ones
        (from ublkshell's registry), with the daemon that serves each. It also tidies up: a
        FUSE device whose daemon died has its mount and loop device removed here.""")
    s.u(e, "list")
    e.say("""STATE is LIVE while the daemon serves; Q x D is hardware queues times tags per
        queue (a FUSE device has one queue); PID is the IO daemon, the process the kernel sees as
        the device's server. BLOCK DEV is where to send IO, FILE the FUSE file behind it.""")
    s.u(e, "list", "--json")
    e.say("""--json prints the same for scripts (docs/schema.md has every key), with sizes in
        bytes and the mount the FUSE file lives in.""")

    # -- trace ----------------------------------------------------------------------------------
    e = s.ex("trace", "every IO as it completes, with its latency and the fault rule that hit it", """
        trace prints IOs as the daemon completes them, read from the record rings the daemon
        writes into shared memory: no kernel tracing, no server needed. Filters pick IOs by
        queue, tag, op, sector range, latency or error; --count and --duration end it, as does
        Ctrl-C. Here fio reads the device at random in the background:""")
    load = fio_load(loop, "randread")
    e.show(load, background=True)
    fio = r.start(load, quiet=True)
    try:
        s.u(e, "trace", dev, "--count", "10", timeout=20)
        e.say("""Each line is one IO: when it completed (seconds since the device started), its
            queue and tag, the op and its flags (FUA, ...), the first sector and the number of
            512-byte sectors, the daemon's service time, and the result (bytes moved, or an
            error). A fault rule that acted on the IO is named after the result.""")
        s.u(e, "trace", dev, "--format", "blkparse", "--count", "5", timeout=20)
        e.say("""--format blkparse prints the line blkparse would for each completion (C): device
            major,minor, queue as the CPU column, sequence, time, the daemon's pid, RWBS, sector +
            count and the error, then the tag and latency blkparse has no column for.""")
        s.u(e, "trace", dev, "op=read", "lba=0..16383", "--json", "--count", "2", timeout=20)
        e.say("""Filters narrow it: op=read and the first 8 MiB here. --json prints one object per
            IO, with times and latencies in nanoseconds, for scripts.""")
    finally:
        r.finish(fio, timeout=10, stop=True)

    # -- stats, lat (and top, info) under a mixed load -----------------------------------------------
    st = s.ex("stats", "IOs, bytes, errors and latency percentiles per op; iostat-style rows", """
        stats reads a device's counters and latency histograms from its shared memory, which
        the daemon updates as it completes each IO (they outlive a killed daemon). The latency
        is the daemon's service time: from taking the request from the driver to handing back
        the result. Here fio reads and writes 4 KiB blocks at random, with an fsync (a FLUSH)
        every 32 writes:""")
    lt = s.ex("lat", "the latency histogram of one op, with percentiles", """
        lat prints one op's latency histogram (the daemon's service time) with its
        percentiles. The buckets are log-linear, about 3% wide, so the percentiles are within 3%
        of the truth at any scale, from hundreds of nanoseconds to seconds. Only buckets that
        hold IOs are printed.""")
    tp = s.ex("top", "IOPS, MiB/s, latency and IO in flight per device, queue and op, refreshed", """
        top shows, refreshed every --interval, each device (or the ones named) per queue and op:
        IOPS and MiB/s, the daemon's service time (avg, p50, p99, p99.9) of the IOs that completed
        in the interval, and tags in flight now. On a terminal it is a full screen until q;
        --count N prints N plain frames and exits, as top -b does, and so does output that is
        not a terminal.""") if has_verb(r, "top") else None
    inf = s.ex("info", "one device's line from list, with its stats", """
        info shows one device: what list says about it, then its counters and latency as stats
        prints them.""") if has_verb(r, "info") else None
    load = fio_load(loop, "randrw", ["--fsync=32"])
    st.show(load, background=True)
    fio = r.start(load, quiet=True)
    try:
        time.sleep(0.5)  # fio's first IO, so the first interval row is a busy one
        s.u(st, "stats", dev, "--interval", "1", "--count", "3", timeout=20)
        st.say("""With --interval, a row per interval as iostat -x computes it from the kernel's
            /sys/block stat (IOs per second, MiB/s, await: the kernel's time per IO from the
            moment the block layer accepted it, aqu-sz, %util), and beside it r_svc and w_svc, the
            daemon's service time in ms. await less svc is what the kernel, the queue and the trip
            to the daemon and back added.""")
        if tp:
            s.u(tp, "top", dev, "--count", "1", timeout=20)
            tp.say("""One frame, taken while fio read and wrote at random: a row per op that had IO
                in the interval. Q all sums the device's queues (a device with several has a
                row per queue below); INFL, on a group's first row, is its tags in flight now.""")
        if inf:
            s.u(inf, "info", dev)
            inf.say("""The same device as list shows it, with its counters, taken while fio ran.""")
    finally:
        r.finish(fio, timeout=10, stop=True)
    r.settle()
    s.u(st, "stats", dev)
    st.say("""Once fio stopped: a line per op that has seen IO, with count, bytes, errors and the
        service time's average, median, 99th percentile and maximum. The ring line is the cost
        of crossing to the kernel: io_uring_enter calls per IO, completions each enter brought,
        and IOs per commit (more than 1 when the daemon batches).""")
    s.u(st, "stats", dev, "--queues")
    st.say("""--queues adds the same lines for each hardware queue (qN), to see whether one queue
        does all the work.""")
    s.u(st, "stats", dev, "--json")
    st.say("""--json: every op, also those without IO, with latencies in nanoseconds, and the
        same per queue.""")
    s.u(lt, "lat", dev)
    lt.say("""read is the default op. The first line has the count, average and percentiles;
        each row is a bucket's range, its count and a bar scaled to the fullest bucket. Most
        reads of this mem device take a few microseconds; the rows below show the tail the
        p99.9 and max summarize.""")
    s.u(lt, "lat", dev, "write")
    lt.say("""The writes fio issued alongside, with their own percentiles: compare the two to see
        which op a slow tail belongs to.""")
    s.u(lt, "lat", dev, "discard")
    lt.say("""An op without IO says so.""")

    # -- metrics ----------------------------------------------------------------------------------
    e = s.ex("metrics", "every device's counters in the Prometheus text format", """
        metrics prints every device's counters, in-flight IOs, latency histogram, fault rule
        hits and daemon recoveries in the Prometheus text format, which node_exporter's textfile
        collector reads (docs/metrics.md has the list and a recipe). --format openmetrics
        prints OpenMetrics instead.""")
    res = r.u("metrics")
    e.show(["ublkshell", "metrics"], res, pipe="head -n 24", head=24)
    e.say("""Each metric has its HELP and TYPE lines, and a sample per device (and per queue and
        op where it has them), labelled with the device's name. The full output goes on with
        the errors, in-flight IOs, the latency histogram's buckets and the fault rules' hits.""")

    # -- record, blkparse, btt --------------------------------------------------------------------
    e = s.ex("record", "a device's IO to blktrace files for blkparse and btt, or an fio iolog", """
        record writes completed IOs to files other tools read: blktrace's binary format by
        default (one file per queue, as blktrace writes one per CPU) for blkparse and btt, or
        an fio iolog (--format fio-iolog) that fio replays. It takes the same filters as trace;
        here it keeps the IOs in a 32 KiB range while dd writes and then reads two blocks there
        (with oflag=direct, so each dd block is one IO):""")
    out = TMP / "run"
    rec_args = ["record", dev, "-o", str(out), "--duration", "3s", f"lba={MID}..{MID + 63}"]
    rec = r.start([python(), "-m", "ublkshell", *rec_args])
    first = rec.stdout.readline()
    # record says "recording" just before it attaches its reader: IO at once could be missed
    time.sleep(0.5)
    e.show(["ublkshell", *rec_args], background=True, first=first)
    try:
        s.cmd(e, dd_write(loop, mid_block, 2))
        s.cmd(e, dd_read(loop, mid_block, 2))
    finally:
        res = r.finish(rec, timeout=15)
    e.say("""Three seconds after it began, record ends and says what it wrote:""")
    e.parts.append(res.shown())
    e.say("""It names the commands that read the files. Each IO is a Q and a D event at the
        moment the driver handed it to the daemon, and a C event when the daemon committed it.""")
    s.cmd(e, ["blkparse", "-i", str(out)], cwd=str(TMP))
    e.say("""blkparse reads them as it reads blktrace's own files: two writes (W) and two reads
        (R) of 8 sectors each, issued by the daemon's pid, then its per-CPU summary (the CPU
        column is the queue).""")
    btt_dir = TMP / "btt"  # btt writes its .dat files into the current directory
    btt_dir.mkdir(mode=0o700, exist_ok=True)
    s.cmd(e, ["btt", "-i", f"{out}.blktrace.0"], cwd=str(btt_dir), pipe="head -n 16", head=16)
    e.say("""btt's D2C is the daemon's service time, the same figure stats, lat and trace show;
        Q2C equals it, since Q and D are one moment here. What the block layer added before the
        hand-over is for the kernel's own blktrace on the device to show.""")

    # -- delay ------------------------------------------------------------------------------------
    e = s.ex("delay", "make IOs slower: a fixed time, or a range chosen at random", """
        delay adds a fault rule that holds matching IOs in the daemon for a while before they
        complete, as a slow disk would. A rule is an action and words that choose IOs (op=,
        lba, tag, q=, size=, fua) and how often (p=, count=); docs/faults.md has the whole
        grammar. Every fault verb also works through the shell and the stats tree.""")
    s.u(e, "delay", dev, "5ms", "op=write")
    s.cmd(e, dd_write(loop, mid_block, 4))
    e.say("""Four direct 4 KiB writes took about 20 ms: 5 ms each, one after another. Reads are not
        matched by the rule and keep their speed.""")
    s.u(e, "lat", dev, "write")
    e.say("""The four writes are the bucket near 5 ms, far from the fio writes' microseconds: lat
        shows the daemon's service time, and the delay is spent in the daemon.""")
    s.u(e, "clear", dev)
    r.settle()

    # -- fail -------------------------------------------------------------------------------------
    e = s.ex("fail", "make IOs fail with an errno: EIO by default", """
        fail completes matching IOs with an error instead of serving them. Here reads of
        sectors 2048..4095 (the second MiB) fail with EIO, as a disk's unreadable sectors
        would:""")
    s.u(e, "fail", dev, "lba", "2048..4095", "op=read")
    s.cmd(e, dd_read(loop, 256))
    e.say("""dd reads 4 KiB at sector 2048 (block 256) and gets EIO, as from a real disk.""")
    s.cmd(e, dd_read(loop, 512))
    e.say("""Sector 4096 is past the range: that read works.""")
    s.u(e, "faults", dev)
    e.say("""faults lists the rule with its hits: the one read that failed.""")
    s.u(e, "fail", dev, "lba", "4095..2048")
    e.say("""A rule that makes no sense is refused with the column and the reason, and nothing is
        added.""")
    s.u(e, "clear", dev)

    # -- faults, clear, seed --------------------------------------------------------------------------
    e = s.ex("faults", "list a device's fault rules with their hits; clear and seed", """
        faults lists a device's rules in the order they match (the first rule that matches an
        IO acts on it), with how often each acted, and the seed behind their random choices.
        clear removes one rule by id, or all. seed sets the seed, so that the same IO gets the
        same faults again.""")
    s.u(e, "seed", dev, "42")
    res = s.u(e, "delay", dev, "1ms..5ms", "op=read", "p=0.5")
    m = re.search(r"rule #(\d+)", res.out)
    first_rule = m.group(1) if m else "1"
    s.u(e, "fail", dev, "op=write", f"lba={MID}..{MID + 7}", "errno=ENOSPC", "count=1")
    s.cmd(e, dd_read(loop, 0, 8))
    s.cmd(e, dd_write(loop, mid_block))
    e.say("""Eight reads, about half of them delayed by 1 to 5 ms; the write fails once with
        ENOSPC, which dd reports as a full disk.""")
    s.u(e, "faults", dev)
    e.say("""HITS counts the IOs each rule acted on. A rule with count= says how many it has left:
        none, so writes there work again.""")
    s.u(e, "clear", dev, first_rule)
    s.u(e, "faults", dev)
    s.u(e, "clear", dev)
    s.u(e, "faults", dev)
    r.settle()

    # -- inflight (hang) ------------------------------------------------------------------------------
    e = s.ex("inflight", "the tags the daemon is serving now, with their age", """
        inflight lists the IOs the daemon holds right now, per queue and tag, with how long ago
        it took each and the fault rule holding it, if any. An IO that stays here is a stuck
        one. To have one, a hang rule withholds a read, which dd waits for in the background:""")
    s.u(e, "hang", dev, "lba", f"{MID}..{MID + 7}")
    dd = r.start(dd_read(loop, mid_block))
    e.show(dd_read(loop, mid_block), background=True)
    time.sleep(0.2)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "hang" not in r.u("inflight", dev).out:
        time.sleep(0.1)
    time.sleep(0.3)  # an age that reads as an age
    s.u(e, "inflight", dev)
    e.say("""dd's read of 8 sectors at sector 65536, on queue 0: AGE is how long ago the daemon
        took it, FAULT the rule that holds it. dd waits for it meanwhile, as a filesystem
        would.""")
    s.u(e, "faults", dev)
    e.say("""faults counts it as withheld.""")
    s.u(e, "clear", dev)
    res = r.finish(dd, timeout=10)
    e.say("""dd, waiting in the background, finishes:""")
    e.parts.append(res.shown())
    e.say("""Clearing the rule completes what it withheld (within 20 ms): dd finishes, its time
        the time the read was held.""")
    s.u(e, "inflight", dev)

    # -- powercut -------------------------------------------------------------------------------------
    e = s.ex("powercut", "forget every write no FLUSH made durable, as a power loss would", """
        A device added with --powercut remembers, for each write that no FLUSH (or FUA) has
        made durable yet, what it overwrote. powercut undoes exactly those writes in the backing
        store and stops the daemon without a word to the kernel: what is left is what a disk may
        legally hold after the power went. --partial keeps a random half of them instead.""")
    res = s.u(e, "add", "--transport", "fuse", "-t", "mem", "--size", "16M", "--loop", "--powercut",
              "-n", str(PC_DEV))
    if res.rc == 0:
        pc_loop = s.loop_of(pc, res)
        s.cmd(e, dd_write(pc_loop, 0, 4, "/dev/urandom", ["conv=fsync"]))
        s.cmd(e, dd_write(pc_loop, 100, 3, "/dev/urandom"))
        e.say("""The first four writes were made durable by dd's fsync (a FLUSH); the three after
            them were not.""")
        r.settle()
        s.u(e, "powercut", pc)
        e.say("""The three unflushed writes were undone, the flushed ones kept.""")
        s.u(e, "list")
        e.say("""The device is DEAD: its daemon is gone, and with it the FUSE mount and the loop
            device. Its statistics stay, for stats and trace, until del.""")
        s.u(e, "del", pc)

    # -- del --------------------------------------------------------------------------------------
    e = s.ex("del", "delete devices: the daemon stops, the loop device and mount go", """
        del stops a device's daemon and deletes the device: for a FUSE-transport one, the loop
        device is detached, the FUSE mount removed, the files and statistics deleted. -a deletes
        every device.""")
    s.u(e, "del", dev)
    s.u(e, "del", dev)
    e.say("""A device that is not there is an error, with its name.""")
    s.u(e, "list")


# -- files --------------------------------------------------------------------------------------------
def index(examples: dict) -> str:
    lines = ["# Examples: each verb and its real output", "",
             wrap("""One file per verb, in the style of bcc's tools/*_example.txt: what the verb is for,
             then real commands, their real output, and what to read in it. They were made on a
             FUSE-transport device with a loop device on it (`add --transport fuse ... --loop`), so
             with no ublk_drv; on a ublk device the output is the same but for its name (0, 1, ...)
             and /dev/ublkbN."""), "",
             wrap("""`scripts/examples.py` makes them: it creates the devices, runs the commands and
             writes this directory (its devices live in a private registry, whose paths are shown
             as the defaults, /run/ublkshell and /var/tmp). `tests/test_examples.py` runs it again
             and fails, with a diff, when any command's output changed in more than its numbers:
             run `scripts/examples.py` to regenerate, and commit the files."""), ""]
    lines += [f"- [{name}_example.txt]({name}_example.txt): {e.summary}" for name, e in examples.items()]
    return "\n".join(lines) + "\n"


def write(examples: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    made = {f"{name}_example.txt": e.render() for name, e in examples.items()}
    made["README.md"] = index(examples)
    for name, text in made.items():
        (out / name).write_text(text)
    # a verb that no longer has an example leaves no stale file behind
    for p in out.glob("*_example.txt"):
        if p.name not in made:
            p.unlink()


def mounts_under(path: Path) -> list:
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == str(path) or point.startswith(str(path) + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def cleanup(r: Runner) -> list:
    """Stop what we started, delete every device in our registry, leave no mount; what is left."""
    r.stop_all()
    left = []
    if STATE.exists():
        def listed():
            return {d["name"] for d in devices_in(r.u("list", "--json").out) if ID.fullmatch(d["name"])}

        for name in sorted(listed() | {f"fuse{DEV}", f"fuse{PC_DEV}"}):  # the private registry: only ours
            r.u("del", name)
        left += [f"device {name}" for name in sorted(listed())]
    for point in mounts_under(BASE):
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=30)
    left += [f"mount {p}" for p in mounts_under(BASE)]
    if not left:
        shutil.rmtree(BASE, ignore_errors=True)
    return left


@contextlib.contextmanager
def locked():
    """One run at a time on this machine: the test and a hand run share the fixed paths."""
    with open(LOCK, "a") as f:
        deadline = time.monotonic() + 300
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"examples: {LOCK} stayed locked for 5 minutes")
                time.sleep(0.5)
        yield


def make(out: Path) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupted)
    r = Runner()
    with locked():
        left = cleanup(r)  # what a SIGKILLed run left
        if left:
            raise SystemExit(f"examples: cannot clear what an earlier run left: {', '.join(left)}")
        BASE.mkdir(mode=0o700)
        TMP.mkdir(mode=0o700)
        DATA.mkdir(mode=0o700)
        s = Session(r)
        try:
            generate(s)
        finally:
            # a second signal must not cut the cleanup short
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_IGN)
            left = cleanup(r)
            if left:
                print(f"examples: left behind: {', '.join(left)}", file=sys.stderr)
        write(s.examples, out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write (default docs/examples)")
    g.add_argument("--check", type=Path, nargs="?", const=DEFAULT_OUT, metavar="DIR",
                   help="generate into a temporary directory and compare with DIR (default docs/examples)")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("examples: needs root (devices, loop devices, FUSE mounts)", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    try:
        if a.check is None:
            make(a.out)
            print(f"examples: wrote {a.out} in {time.monotonic() - t0:.0f} s")
            return 0
        with tempfile.TemporaryDirectory(prefix="ublkshell-examples-") as tmp:
            make(Path(tmp))
            problems = compare(a.check, Path(tmp))
        for p in problems:
            print(p, end="\n\n")
        if problems:
            print(f"examples: {a.check} does not match the commands' output: {REGEN}")
            return 1
        print(f"examples: {a.check} matches ({time.monotonic() - t0:.0f} s)")
        return 0
    except Interrupted as e:
        print(f"examples: interrupted ({e}); devices deleted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
