"""Trace out to the tools users know, and back in: `record` writes blktrace files that the
real blkparse and btt read, and fio iologs that the real fio replays; `trace --format
blkparse` prints blkparse's line. Encoding is checked against blkparse itself; the whole
path against a FUSE-transport device (no ublk_drv needed; tests/vm has the same on ublk)."""
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections import Counter

import pytest

from ublkshell.observe import blktrace
from ublkshell.errors import UblkError, UsageError
from ublkshell.observe import shm as shm_mod
from ublkshell.observe.recording import BlktraceFiles, Iolog, Ordered, in_flight_since, pump

needs_blkparse = pytest.mark.skipif(not shutil.which("blkparse") or not shutil.which("btt"),
                                    reason="blkparse and btt (Debian package blktrace) are needed")


def rec(op, sector=8, sectors=8, t=1000, lat=500, result=None, flags=(), queue=0, tag=0, fault=None):
    return {"t_ns": t, "queue": queue, "tag": tag, "op": op, "flags": list(flags), "sector": sector,
            "sectors": sectors, "lat_ns": lat, "result": sectors * 512 if result is None else result,
            "fault": fault}


def blkparse(base, *args):
    p = subprocess.run(["blkparse", "-i", str(base), *args], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout


def completed(blkparse_out: str) -> dict:
    """blkparse's summary: {"Reads": (IOs, KiB), "Writes": (IOs, KiB)}."""
    import re

    return {m[0]: (int(m[1]), int(m[2]))
            for m in re.findall(r"(Reads|Writes) Completed:\s+(\d+),\s+(\d+)KiB", blkparse_out)}


def write_files(base, records, nr_queues=1, pid=4321, dev=(259, 7), force=False):
    w = BlktraceFiles(str(base), nr_queues, pid, dev, force=force)
    for r in records:
        w.add(r)
    w.close()
    w.outputs.commit()
    return w


@needs_blkparse
def test_blkparse_reads_every_op_as_the_kernel_trace_shows_it(tmp_path):
    records = [rec("read", 0, t=100), rec("write", 8, t=200, flags=["fua"]), rec("flush", 0, 0, t=300),
               rec("discard", 64, 16, t=400), rec("write_zeroes", 128, 8, t=500),
               rec("read", 256, 8, t=600, result=-5)]
    write_files(tmp_path / "t", records)
    out = blkparse(tmp_path / "t")
    c = [line.split() for line in out.splitlines() if line.split()[5:6] == ["C"]]
    # device, action, RWBS, sector [+ count], error: the columns blkparse users read
    assert [(x[0], x[6], x[7]) for x in c] == [("259,7", "R", "0"), ("259,7", "WF", "8"), ("259,7", "FN", "0"),
                                               ("259,7", "D", "64"), ("259,7", "W", "128"), ("259,7", "R", "256")]
    assert c[0][8:] == ["+", "8", "[0]"] and c[2][8:] == ["[0]"]
    assert c[-1][-1] == "[65531]"  # the kernel stores -EIO in 16 bits
    # Q and D carry the hand-over, with the process name the notify gave
    assert "Q   R 0 + 8 [ublkshell]" in out and "D   R 0 + 8 [ublkshell]" in out
    # reads and the flush, as blkparse counts a kernel trace's
    assert completed(out) == {"Reads": (3, 8), "Writes": (3, 16)}


@needs_blkparse
def test_queues_are_cpus_and_btt_finds_the_service_time(tmp_path):
    # two queues, IOs completing out of the order they began
    records = [rec("write", 8 * i, t=1_000 * i, lat=5_000 if i % 2 else 500, queue=i % 2, tag=i)
               for i in range(20)]
    records.sort(key=lambda r: r["t_ns"] + r["lat_ns"])
    w = write_files(tmp_path / "q", records, nr_queues=2)
    assert [os.path.basename(p) for p in w.paths] == ["q.blktrace.0", "q.blktrace.1"]
    assert all(os.stat(p).st_mode & 0o777 == 0o600 for p in w.paths)
    bin_ = tmp_path / "q.bin"
    blkparse(tmp_path / "q", "-q", "-d", str(bin_))
    # btt leaves per-device .dat files in its working directory
    p = subprocess.run(["btt", "-i", str(bin_)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    d2c = next(line.split() for line in p.stdout.splitlines() if line.startswith("D2C"))
    # min, avg, max (seconds) and N: 10 IOs of 0.5 us and 10 of 5 us
    assert [float(d2c[1]), float(d2c[2]), float(d2c[3]), int(d2c[4])] == [0.0000005, 0.00000275, 0.000005, 20]
    # each queue's events are numbered in time order, as blktrace numbers a CPU's
    out = blkparse(tmp_path / "q")
    for q in (0, 1):
        times = [float(x.split()[3]) for x in out.splitlines() if x.split()[1:2] == [str(q)]
                 and x.split()[5:6] in (["Q"], ["D"], ["C"])]
        assert times == sorted(times) and len(times) == 30


def test_text_line_is_blkparse_then_ours():
    f = blktrace.TextFormat(259, 3, 77)
    line = f.line(rec("write", 2048, 8, t=1_500_000_000, lat=2_000_000, result=-5, tag=9, fault="drop#2"))
    assert line.startswith("259,3    0        1     1.502000000    77  C   W 2048 + 8 [65531] tag=9 lat=2ms EIO fault=")
    assert f.line(rec("flush", 0, 0)).split()[5:9] == ["C", "FN", "0", "[0]"]
    assert f.line(rec("read", queue=1)).split()[1:3] == ["1", "1"]  # per-queue sequence


def test_iolog_in_the_order_the_ios_began(tmp_path):
    import io

    out = io.StringIO()
    log = Iolog("/dev/ublkb3", out=out)
    # completion order differs from start order; write_zeroes has no fio action
    for r in (rec("write", 16, t=5_000, lat=10), rec("read", 8, t=2_000, lat=9_000),
              rec("write_zeroes", 0, t=6_000), rec("discard", 32, 8, t=7_000), rec("flush", 0, 0, t=9_000)):
        log.add(r)
    log.flush(6_000)  # only IOs that began before 6 us
    assert out.getvalue().splitlines()[3:] == ["0 /dev/ublkb3 read 4096 4096", "3 /dev/ublkb3 write 8192 4096"]
    log.add(rec("read", 64, t=4_000))  # began before what was written: written late, never back in time
    log.close()
    assert out.getvalue().splitlines() == [
        "fio version 3 iolog", "0 /dev/ublkb3 add", "0 /dev/ublkb3 open",
        "0 /dev/ublkb3 read 4096 4096", "3 /dev/ublkb3 write 8192 4096", "3 /dev/ublkb3 read 32768 4096",
        "5 /dev/ublkb3 trim 16384 4096", "7 /dev/ublkb3 sync 0 0", "7 /dev/ublkb3 close"]
    assert log.summary()["skipped"] == {"write_zeroes": 1} and log.summary()["late"] == 1


def test_ordered_releases_only_what_is_older():
    o = Ordered()
    for t in (5, 1, 3, 9):
        o.add(t, t)
    assert o.release(4) == [1, 3] and o.release(4) == [] and o.release(None) == [5, 9]


def test_files_are_never_replaced_or_followed_unasked(tmp_path):
    (tmp_path / "x.blktrace.0").write_bytes(b"keep")
    with pytest.raises(UsageError, match=r"x.blktrace.0 exists \(--force replaces it\)"):
        BlktraceFiles(str(tmp_path / "x"), 1, 1, (0, 0), force=False)
    assert (tmp_path / "x.blktrace.0").read_bytes() == b"keep"
    # a symlink planted where the file goes is replaced (asked to), its target untouched
    target = tmp_path / "victim"
    target.write_bytes(b"precious")
    os.symlink(target, tmp_path / "y.blktrace.0")
    write_files(tmp_path / "y", [rec("read")], force=True)
    assert target.read_bytes() == b"precious" and not os.path.islink(tmp_path / "y.blktrace.0")
    # a directory in the way of the second queue's file: neither file stays, nor a temporary one
    os.mkdir(tmp_path / "z.blktrace.1")
    with pytest.raises(UsageError, match="is a directory"):
        BlktraceFiles(str(tmp_path / "z"), 2, 1, (0, 0), force=True)
    assert not list(tmp_path.glob("*z.blktrace.0*"))


def test_a_file_that_appears_while_recording_is_kept_and_so_is_the_recording(tmp_path):
    w = BlktraceFiles(str(tmp_path / "r"), 1, 1, (0, 0), force=False)
    w.add(rec("read"))
    w.close()
    (tmp_path / "r.blktrace.0").write_bytes(b"theirs")  # planted between the check and the end
    with pytest.raises(UblkError, match="appeared meanwhile.*what was written is in"):
        w.outputs.commit()
    assert (tmp_path / "r.blktrace.0").read_bytes() == b"theirs"
    (kept,) = tmp_path.glob("r.blktrace.0.kept-*")
    # a later run does not take it for a dead run's leftovers
    write_files(tmp_path / "r2", [rec("read")])
    assert kept.exists()
    assert kept.stat().st_size == blktrace.EVENT.size * 4 + len(blktrace.PROCESS_NAME) + 1


def test_the_directory_is_the_one_named_at_the_start(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "elsewhere").mkdir()
    w = BlktraceFiles(str(tmp_path / "d" / "r"), 1, 1, (0, 0), force=False)
    # the directory is swapped for a symlink to another while the recording runs
    os.rename(tmp_path / "d", tmp_path / "d.old")
    os.symlink(tmp_path / "elsewhere", tmp_path / "d")
    w.close()
    w.outputs.commit()
    assert os.listdir(tmp_path / "elsewhere") == [] and os.listdir(tmp_path / "d.old") == ["r.blktrace.0"]


def test_another_runs_extra_queue_files_are_refused_or_replaced(tmp_path):
    for q in (0, 1, 2):
        (tmp_path / f"o.blktrace.{q}").write_bytes(b"old")
    with pytest.raises(UsageError, match="o.blktrace.0 exists"):
        BlktraceFiles(str(tmp_path / "o"), 1, 1, (0, 0), force=False)
    write_files(tmp_path / "o", [rec("read")], force=True)
    # blkparse -i o would have merged the old queues 1 and 2 into this one-queue recording
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.blktrace.0"]


def test_device_nodes_and_pipes_are_never_replaced(tmp_path):
    os.mkfifo(tmp_path / "p.blktrace.0")
    with pytest.raises(UsageError, match="is not a regular file"):
        Iolog("/dev/ublkb0", path="/dev/null", force=True)
    with pytest.raises(UsageError, match="is not a regular file"):
        BlktraceFiles(str(tmp_path / "p"), 1, 1, (0, 0), force=True)
    assert os.path.exists("/dev/null") and stat.S_ISFIFO(os.stat(tmp_path / "p.blktrace.0").st_mode)


class _Records:
    """A Follow of made-up records: n of them, then done."""

    def __init__(self, n):
        self.left, self.lost = n, 0

    @property
    def done(self):
        return self.left == 0

    def poll(self):
        got = [rec("write", 8 * i, t=1000 * i) for i in range(min(self.left, 5000))]
        self.left -= len(got)
        return got


@pytest.fixture
def small_fs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    d = tmp_path / "small"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "small", str(d)], check=True)
    yield d
    subprocess.run(["umount", "-l", str(d)], check=False)


def test_a_full_disk_is_one_line_and_leaves_nothing(small_fs, shm):
    w = BlktraceFiles(str(small_fs / "run"), 1, 1, (0, 0), force=False)
    with pytest.raises(UblkError, match=r"^record: writing .*small failed: No space left on device$"):
        pump(shm, _Records(20_000), w)
    assert os.listdir(small_fs) == []


def test_a_hung_io_holds_back_nothing(shm):
    from ublkshell._native import lib
    from ublkshell.observe.names import ACTION_CODES

    w = shm_mod.Shm(shm.path, writable=True)
    try:
        tags = lib.us_shm_tags(w.base, 0)
        tags[3].t_start_ns = lib.us_now_ns() - 5_000_000_000
        tags[3].state = 1
        base = int(shm.hdr.created_mono_ns)
        held = in_flight_since(shm)
        assert held == int(tags[3].t_start_ns) - base  # an IO in flight holds the mark
        tags[3].fault = ACTION_CODES["hang"] | 1 << 8
        assert in_flight_since(shm) > held + 4_000_000_000  # one a hang rule withholds does not
        tags[3].fault = 0
        tags[3].t_start_ns = lib.us_now_ns() - 60_000_000_000
        # nor, past 10 s, one the store never answers
        assert lib.us_now_ns() - base - in_flight_since(shm) <= 10_000_000_000 + 1_000_000_000
    finally:
        w.close()


@pytest.fixture
def shm(tmp_path, monkeypatch):
    monkeypatch.setenv("UBLKSHELL_DATA_DIR", str(tmp_path / "data"))
    s = shm_mod.create(11, nr_queues=1, depth=8, records=16, pid=os.getpid())
    yield s
    s.close()


# -- the whole path, on a FUSE-transport device -----------------------------------
fuse_only = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse") or not shutil.which("fio"),
                               reason="needs root, /dev/fuse and fio")


class Env:
    def __init__(self, root):
        self.root = str(root)
        mem = os.path.join(self.root, "mem")
        os.makedirs(mem, mode=0o700)
        self.env = dict(os.environ, UBLKSHELL_STATE_DIR=os.path.join(self.root, "state"), UBLKSHELL_DATA_DIR=mem)

    def cmd(self, *args):
        return [sys.executable, "-m", "ublkshell", *args]

    def run(self, *args, check=True):
        p = subprocess.run(self.cmd(*args), capture_output=True, text=True, timeout=120, env=self.env, cwd="/")
        assert not check or p.returncode == 0, (args, p.stderr)
        return p

    def start(self, *args):
        return subprocess.Popen(self.cmd(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=self.env, cwd="/")

    def add(self) -> dict:
        return json.loads(self.run("add", "--transport", "fuse", "-t", "mem", "--size", "32M", "--json").stdout)


@pytest.fixture
def env(tmp_path_factory):
    e = Env(tmp_path_factory.mktemp("rec"))
    yield e
    e.run("del", "-a", check=False)


def started(p, what="recording"):
    # the recorder says so on stderr once it follows the device
    line = p.stderr.readline()
    assert line.startswith(what), line
    time.sleep(0.2)


def fio(path, n, *extra):
    subprocess.run(["fio", "--name=w", f"--filename={path}", "--rw=randrw", "--bs=4k", "--size=16M",
                    "--direct=1", "--ioengine=psync", f"--number_ios={n}", "--randseed=7",
                    "--output-format=terse", *extra], check=True, capture_output=True, timeout=120)


@fuse_only
@needs_blkparse
def test_record_blktrace_counts_equal_stats(env, tmp_path):
    dev = env.add()
    base = tmp_path / "run"
    p = env.start("record", dev["name"], "-o", str(base), "--count", "300", "--json")
    started(p)
    fio(dev["file"], 300)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    summary = json.loads(out)
    assert summary["ios"] == 300 and summary["lost"] == 0 and summary["files"] == [f"{base}.blktrace.0"]
    st = json.loads(env.run("stats", dev["name"], "--json").stdout)["ops"]
    parsed = blkparse(base).replace("\t", " ")
    reads, writes = st["read"]["ios"], st["write"]["ios"]
    assert reads + writes == 300 and reads > 50 and writes > 50
    assert completed(parsed) == {"Reads": (reads, reads * 4), "Writes": (writes, writes * 4)}
    # the text twin: the same completions, blkparse's columns then ours
    lines = env.run("trace", dev["name"], "--format", "blkparse", "--from-start", "--count", "300").stdout.splitlines()
    assert len(lines) == 300 and all(" C " in line and " tag=" in line and " lat=" in line for line in lines)
    assert Counter(line.split()[6] for line in lines) == {"R": reads, "W": writes}


@fuse_only
def test_fio_replays_the_iolog_with_the_same_ios(env, tmp_path):
    a, b = env.add(), env.add()
    log, again = tmp_path / "job.iolog", tmp_path / "again.iolog"
    p = env.start("record", a["name"], "-o", str(log), "--format", "fio-iolog", "--count", "200")
    started(p)
    fio(a["file"], 200)
    assert p.wait(timeout=60) == 0, p.stderr.read()
    q = env.start("record", b["name"], "-o", str(again), "--format", "fio-iolog", "--count", "200")
    started(q)
    subprocess.run(["fio", "--name=replay", f"--read_iolog={log}", f"--replay_redirect={b['file']}",
                    "--replay_no_stall=1", "--direct=1", "--output-format=terse"],
                   check=True, capture_output=True, timeout=120)
    assert q.wait(timeout=60) == 0, q.stderr.read()
    ios = lambda path: [line.split()[2:] for line in path.read_text().splitlines()[3:-1]]  # noqa: E731
    # op, offset and length of every IO, in the same order, at times that never go back
    assert ios(log) == ios(again) and len(ios(log)) == 200
    times = [int(line.split()[0]) for line in log.read_text().splitlines()[1:]]
    assert times == sorted(times) and times[-1] > 0
    assert {x[0] for x in ios(log)} == {"read", "write"}


@fuse_only
def test_record_bad_input_is_one_line(env, tmp_path):
    quiet = json.loads(env.run("add", "--transport", "fuse", "-t", "null", "--size", "32M", "--no-records",
                               "--json").stdout)
    for verb in (["record", quiet["name"], "-o", str(tmp_path / "q")], ["trace", quiet["name"]]):
        p = env.run(*verb, check=False)
        assert (p.returncode, p.stderr) == (
            1, f"ublkshell: {verb[0]}: device {quiet['name']} was added with --no-records: it keeps no records\n")
    dev = env.add()
    for args, code, words in ((["-o", str(tmp_path / "x"), "--format", "pcap"], 2, "unknown format 'pcap'"),
                              (["-o", str(tmp_path / "no" / "x")], 1, "No such file or directory"),
                              (["-o", str(tmp_path / "x"), "--count", "-1"], 2, "--count"),
                              (["-o", str(tmp_path / "x"), "--duration", "soon"], 2, "--duration"),
                              (["-o", str(tmp_path / "x"), "op=sideways"], 2, "trace filter op=sideways: 'sideways' is not an op"),
                              (["op=read", "-o", str(tmp_path / "x"), "lba=9..1"], 2, "the range is empty"),
                              ([], 2, "-o/--output")):
        p = env.run("record", dev["name"], *args, check=False)
        assert p.returncode == code, p
        assert words in p.stderr and len(p.stderr.splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
    assert not list(tmp_path.glob("x*")), "a refused recording left files"
    p = env.run("trace", dev["name"], "--format", "blkparse", "--json", check=False)
    assert p.returncode == 2 and "not both" in p.stderr


@fuse_only
def test_sigterm_ends_a_recording_with_its_files_and_sigkill_leaves_nothing(env, tmp_path):
    dev = env.add()
    out = tmp_path / "out"
    out.mkdir()
    p = env.start("record", dev["name"], "-o", str(out / "t"))
    started(p)
    fio(dev["file"], 50)
    p.send_signal(signal.SIGTERM)  # `timeout 30 ublkshell record ...`
    assert p.wait(timeout=60) == 0, p.stderr.read()
    assert os.listdir(out) == ["t.blktrace.0"] and os.path.getsize(out / "t.blktrace.0") > 50 * blktrace.EVENT.size
    k = env.start("record", dev["name"], "-o", str(out / "k"))
    started(k)
    fio(dev["file"], 50)
    k.kill()
    k.wait(timeout=60)
    assert os.listdir(out) == ["t.blktrace.0"], "a killed recording left files"


def test_a_dead_runs_temporaries_go_and_nothing_else(tmp_path):
    # on a filesystem without unnamed files, a killed run leaves .NAME.PID.X.tmp behind
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".r.blktrace.0.{dead.pid}.abc.tmp"
    stale.write_bytes(b"old")
    live = tmp_path / f".r.blktrace.0.{os.getpid()}.def.tmp"
    live.write_bytes(b"running")
    target = tmp_path / "precious"
    target.write_bytes(b"keep")
    os.symlink(target, tmp_path / f".r.blktrace.0.{dead.pid}.lnk.tmp")
    other = tmp_path / f".other.{dead.pid}.abc.tmp"
    other.write_bytes(b"not ours to judge")
    write_files(tmp_path / "r", [rec("read")])
    left = sorted(p.name for p in tmp_path.iterdir())
    assert stale.name not in left and live.name in left and other.name in left and "r.blktrace.0" in left
    # a symlink is no file of ours: left alone, and never followed
    assert f".r.blktrace.0.{dead.pid}.lnk.tmp" in left and target.read_bytes() == b"keep"


def test_named_temporaries_where_there_are_no_unnamed_files(tmp_path, monkeypatch):
    from ublkshell.observe.outputs import Outputs

    monkeypatch.setattr(Outputs, "_unnamed", lambda self: None)  # as on a filesystem without O_TMPFILE
    write_files(tmp_path / "n", [rec("read")])
    (tmp_path / "old").write_bytes(b"x")
    os.symlink(tmp_path / "old", tmp_path / "f.blktrace.0")
    write_files(tmp_path / "f", [rec("write")], force=True)
    assert (tmp_path / "old").read_bytes() == b"x" and not os.path.islink(tmp_path / "f.blktrace.0")
    w = BlktraceFiles(str(tmp_path / "m"), 1, 1, (0, 0), force=False)
    assert list(tmp_path.glob(".m.blktrace.0.*.tmp"))  # named while it is written
    w.add(rec("read"))
    w.close()
    (tmp_path / "m.blktrace.0").write_bytes(b"theirs")
    with pytest.raises(UblkError, match="appeared meanwhile"):
        w.outputs.commit()
    assert (tmp_path / "m.blktrace.0").read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("m.blktrace.0.kept-")) == [
        "f.blktrace.0", "m.blktrace.0", "n.blktrace.0", "old"]
