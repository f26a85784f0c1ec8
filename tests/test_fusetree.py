"""The FUSE stats tree, mounted for real (needs root and /dev/fuse, no ublk
driver): statistics files recorded through the C code, a fake server as the
device source, and plain open/read/listdir from the test's side."""
import errno
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

trio = pytest.importorskip("trio")
pytest.importorskip("pyfuse3")

from ublkshell import procs  # noqa: E402
from ublkshell._native import lib  # noqa: E402
from ublkshell.bridge.tree import mount as fusetree  # noqa: E402
from ublkshell.bridge.tree import ops as tree_ops  # noqa: E402
from ublkshell.kernel import mounts  # noqa: E402
from ublkshell.observe import shm as shm_mod  # noqa: E402

READ, WRITE, FLUSH = lib.UBLK_IO_OP_READ, lib.UBLK_IO_OP_WRITE, lib.UBLK_IO_OP_FLUSH
DEV_FILES = ["faults", "faults.json", "inflight", "inflight.json", "info", "info.json", "latency", "latency.json",
             "params", "params.json", "queues", "stats", "stats.json", "trace", "trace.json"]

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                                reason="mounting FUSE needs root and /dev/fuse")


class FakeSource:
    """Stands in for the server: registry-like entries and open Shms."""

    def __init__(self):
        self.entries, self.shms = {}, {}

    def add(self, dev_id, s, **extra):
        self.entries[dev_id] = {
            "id": dev_id, "pid": os.getpid(), "target": "null", "describe": f"null 64M #{dev_id}",
            "size": 64 << 20, "block_size": 4096, "queues": s.nr_queues, "depth": s.depth,
            "max_io": 512 << 10, "flags": 0x2, "spec": {"target": "null", "size": "64M"},
            "stats": s.path, "started": time.time(), **extra}
        self.shms[dev_id] = s

    def remove(self, dev_id):
        self.entries.pop(dev_id, None)
        self.shms.pop(dev_id, None)

    def devices(self):
        return dict(self.entries)

    def shm(self, dev_id):
        return self.shms.get(dev_id)


class TreeThread(threading.Thread):
    """run_tree on its own trio loop, as the server would run it."""

    def __init__(self, mountpoint, source):
        super().__init__(daemon=True)
        self.mountpoint, self.source = mountpoint, source
        self.ready = threading.Event()
        self.error = self.token = self.scope = None

    def run(self):
        async def main():
            self.token = trio.lowlevel.current_trio_token()
            with trio.CancelScope() as self.scope:
                async with trio.open_nursery() as nursery:
                    await nursery.start(fusetree.run_tree, self.mountpoint, self.source)
                    self.ready.set()
        try:
            trio.run(main)
        except BaseException as e:  # handed to the test thread
            self.error = e
        finally:
            self.ready.set()

    def start_and_wait(self):
        self.start()
        assert self.ready.wait(10), "the tree did not mount"
        if self.error:
            raise self.error

    def stop(self):
        if self.is_alive() and self.token is not None:
            try:
                trio.from_thread.run_sync(self.scope.cancel, trio_token=self.token)
            except trio.RunFinishedError:
                pass
        self.join(10)
        assert not self.is_alive(), "the tree did not stop"
        if self.error:
            raise self.error


def _force_unmount(mp):
    if fusetree.is_mounted(mp):
        subprocess.run(["umount", "-l", mp], check=False, capture_output=True)


@pytest.fixture
def shm_dir(tmp_path, monkeypatch):
    d = tmp_path / "shm"
    monkeypatch.setenv("UBLKSHELL_DATA_DIR", str(d))
    return d


@pytest.fixture
def source(shm_dir):
    src = FakeSource()
    a = shm_mod.create(3, nr_queues=2, depth=16, records=16, pid=os.getpid())
    b = shm_mod.create(5, nr_queues=1, depth=8, records=64, pid=os.getpid())
    src.add(3, a)
    src.add(5, b)
    yield src
    a.close()
    b.close()


@pytest.fixture
def trees(monkeypatch):
    """Every StatsTree run_tree makes, to look at its open handles."""
    made = []

    class Recording(fusetree.StatsTree):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch.setattr(fusetree, "StatsTree", Recording)
    return made


@pytest.fixture
def mnt(tmp_path, source, trees):
    mp = str(tmp_path / "mnt")
    t = TreeThread(mp, source)
    try:
        t.start_and_wait()
        yield mp
        t.stop()
        assert not fusetree.is_mounted(mp), "the tree stayed mounted after cancellation"
    finally:
        _force_unmount(mp)


def rec(s, q, tag, op, sector, nr=8, result=4096, lat=1000):
    assert lib.us_shm_record_io(s.base, q, tag, op, sector, nr, result, lat) == 0


def read(path):
    with open(path, "rb") as f:
        return f.read()


def errno_of(fn, *args):
    with pytest.raises(OSError) as e:
        fn(*args)
    return e.value.errno


# -- listing and contents ------------------------------------------------------
def test_listing_shows_devices_files_and_queues(mnt):
    assert sorted(os.listdir(mnt)) == ["metrics", "ublkb3", "ublkb5"]
    assert sorted(os.listdir(f"{mnt}/ublkb3")) == DEV_FILES
    assert sorted(os.listdir(f"{mnt}/ublkb3/queues")) == ["0", "1"]
    assert os.listdir(f"{mnt}/ublkb5/queues") == ["0"]
    assert sorted(os.listdir(f"{mnt}/ublkb3/queues/1")) == ["inflight", "inflight.json", "stats", "stats.json"]
    st = os.stat(f"{mnt}/ublkb3/info")
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o444, 0, 0)
    assert os.stat(f"{mnt}/ublkb3/faults").st_mode & 0o7777 == 0o600
    assert os.stat(f"{mnt}/ublkb3/queues").st_mode & 0o7777 == 0o555
    assert os.stat(mnt).st_mode & 0o7777 == 0o555
    mounts = open("/proc/mounts").read()
    assert any(line.split()[:2] == ["ublkstats", mnt] for line in mounts.splitlines())


def test_unknown_names_are_enoent(mnt):
    for p in ("ublkb4", "ublkb03", "ublkbx", "nothing", "ublkb3/nothing", "ublkb3/queues/2",
              "ublkb3/queues/01", "ublkb3/queues/0/trace", "ublkb3/info/x"):
        assert errno_of(os.stat, f"{mnt}/{p}") in (errno.ENOENT, errno.ENOTDIR), p


def test_sizes_match_what_a_read_gives(mnt, source):
    s = source.shms[3]
    for i in range(20):
        rec(s, i % 2, i % 16, WRITE if i % 3 else READ, i * 8, lat=(i + 1) * 3000)
    names = ["info", "info.json", "params", "params.json", "stats", "stats.json", "latency",
             "latency.json", "inflight", "inflight.json", "faults", "queues/0/stats",
             "queues/1/stats.json", "queues/1/inflight", "queues/1/inflight.json", "faults.json"]
    for n in names:
        p = f"{mnt}/ublkb3/{n}"
        size = os.stat(p).st_size
        data = read(p)
        assert size == len(data) > 0, n
        assert data.endswith(b"\n"), n
    assert os.stat(f"{mnt}/ublkb3/trace").st_size == 0 == os.stat(f"{mnt}/ublkb3/trace.json").st_size


def test_json_counts_match_what_was_recorded(mnt, source):
    s = source.shms[3]
    for i in range(10):
        rec(s, 0, i, WRITE, i * 8, lat=10_000)
    for i in range(4):
        rec(s, 1, i, READ, i * 8, result=-errno.EIO, lat=2_000_000)
    rec(s, 1, 5, FLUSH, 0, nr=0, result=0)
    st = json.loads(read(f"{mnt}/ublkb3/stats.json"))
    assert st["device"] == "3" and st["inflight"] == 0
    assert st["ops"]["write"]["ios"] == 10 and st["ops"]["write"]["bytes"] == 10 * 4096
    assert st["ops"]["read"]["ios"] == 4 and st["ops"]["read"]["errors"] == 4
    assert st["ops"]["flush"]["ios"] == 1 and st["ops"]["discard"]["ios"] == 0
    assert [q["ops"]["write"]["ios"] for q in st["queues"]] == [10, 0]
    q1 = json.loads(read(f"{mnt}/ublkb3/queues/1/stats.json"))
    assert q1["queue"] == 1 and q1["ops"]["read"]["ios"] == 4 and q1["ops"]["write"]["ios"] == 0
    assert q1 == st["queues"][1]

    lat = json.loads(read(f"{mnt}/ublkb3/latency.json"))
    w = lat["ops"]["write"]
    assert w["ios"] == 10 and sum(b["count"] for b in w["buckets"]) == 10
    assert abs(w["p50_ns"] - 10_000) / 10_000 < 0.05 and w["p50_ns"] <= w["p90_ns"] <= w["p99_ns"]
    # the fine buckets, as `lat --json` has them (~3% wide)
    assert all(b["low_ns"] < b["high_ns"] <= 1.05 * b["low_ns"] for b in w["buckets"]), w["buckets"]
    assert abs(lat["ops"]["read"]["p999_ns"] - 2_000_000) / 2_000_000 < 0.05
    text = read(f"{mnt}/ublkb3/latency").decode()
    assert "write: 10 IOs" in text and "read: 4 IOs" in text and "p99.9" in text

    stats = read(f"{mnt}/ublkb3/stats").decode().splitlines()
    row = next(line.split() for line in stats if line.startswith("write "))
    assert row[1] == "10"
    # ublkb5 saw nothing of it
    assert json.loads(read(f"{mnt}/ublkb5/stats.json"))["ops"]["write"]["ios"] == 0
    assert read(f"{mnt}/ublkb5/latency") == b"ublkb5: no IO yet\n"


def test_metrics_parse_and_count_what_was_recorded(mnt, source):
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse
    from prometheus_client.parser import text_string_to_metric_families as prom_parse

    from ublkshell.observe.metrics import exposition

    s = source.shms[3]
    for i in range(6):
        rec(s, i % 2, i, WRITE, i * 8, lat=3_000)  # 3 us
    rec(s, 1, 7, READ, 0, result=-errno.EIO, lat=5_000_000)  # 5 ms
    text = read(f"{mnt}/metrics").decode()
    assert os.stat(f"{mnt}/metrics").st_size == 0 and text.endswith("\n")  # made on open, not on stat
    fams = {f.name: f for f in prom_parse(text)}
    def value(fam, suffix="", **lb):
        return sum(x.value for x in fams[fam].samples if x.name.endswith(suffix) and lb.items() <= x.labels.items())
    assert value("ublkshell_ios", device="3", op="write") == 6  # the parser drops _total
    assert value("ublkshell_ios", device="3", queue="1", op="write") == 3
    assert value("ublkshell_io_errors", device="3", op="read") == 1
    assert value("ublkshell_io_bytes", device="3", op="write") == 6 * 4096
    # the entries name this test's pid, which is no IO daemon
    assert value("ublkshell_daemon_up", device="3") == 0 and value("ublkshell_device_size_bytes", device="5") == 64 << 20
    h = {x.labels["le"]: x.value for x in fams["ublkshell_io_service_seconds"].samples
         if x.name.endswith("_bucket") and x.labels["device"] == "3" and x.labels["op"] == "write"}
    # 3 us IOs: none under 2.048 us, all under 4.096 us
    assert h["2.048e-06"] == 0 and h["4.096e-06"] == 6 and h["+Inf"] == 6
    assert value("ublkshell_io_service_seconds", device="3", op="read", suffix="_sum") == pytest.approx(0.005, rel=0.05)
    # the same samples in OpenMetrics, which its stricter parser accepts
    om = exposition(source.devices(), source.shms.get, openmetrics=True)
    assert om.endswith("# EOF\n")
    assert {f.name for f in om_parse(om)} == set(fams)


def test_info_and_params(mnt, source):
    # a process whose command line names our daemon, recorded with its start time: alive
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "ublkshell.bridge.daemon"])
    try:
        start = procs.start_time(stand_in.pid)
        source.entries[3].update(pid=stand_in.pid, pid_start=start)
        info = json.loads(read(f"{mnt}/ublkb3/info.json"))
        assert info["id"] == 3 and info["pid"] == stand_in.pid and info["daemon_alive"] is True
        assert (info["queues"], info["depth"], info["block_size"], info["size"]) == (2, 16, 4096, 64 << 20)
        text = read(f"{mnt}/ublkb3/info").decode()
        assert "null 64M #3" in text and "2 x 16" in text and f"pid {stand_in.pid} (alive)" in text
        params = json.loads(read(f"{mnt}/ublkb3/params.json"))
        assert params == json.loads(json.dumps(source.entries[3]))
        ptext = read(f"{mnt}/ublkb3/params").decode()
        assert "max_io" in ptext and "spec.target" in ptext
        # a daemon that is gone shows as such; so does a live process that is not our daemon,
        # and one of our daemons under a pid the entry recorded with another start time (reused)
        for pid, pid_start in ((2**22 + 1, None), (os.getpid(), None), (stand_in.pid, start + 1)):
            source.entries[5].update(pid=pid, pid_start=pid_start)
            assert json.loads(read(f"{mnt}/ublkb5/info.json"))["daemon_alive"] is False, pid
    finally:
        stand_in.kill()
        stand_in.wait()


def test_inflight_shows_tags_being_served(mnt, source):
    s = source.shms[3]
    assert read(f"{mnt}/ublkb3/inflight") == b"ublkb3: nothing in flight\n"
    w = shm_mod.Shm(s.path, writable=True)
    try:
        tags = lib.us_shm_tags(w.base, 1)
        tags[7].t_start_ns = lib.us_now_ns() - 5_000_000
        tags[7].start_sector, tags[7].nr_sectors, tags[7].op_flags = 4096, 16, WRITE
        tags[7].state = 1
        w.queue(1).inflight = 1
        got = json.loads(read(f"{mnt}/ublkb3/inflight.json"))
        assert [(t["queue"], t["tag"], t["op"], t["sector"]) for t in got["tags"]] == [(1, 7, "write", 4096)]
        assert got["tags"][0]["age_ns"] >= 5_000_000
        assert "4096+16" in read(f"{mnt}/ublkb3/queues/1/inflight").decode()
        assert b"nothing in flight" in read(f"{mnt}/ublkb3/queues/0/inflight")
        assert json.loads(read(f"{mnt}/ublkb3/stats.json"))["inflight"] == 1
    finally:
        del tags
        w.close()


def test_an_open_file_keeps_its_snapshot(mnt, source):
    s = source.shms[3]
    with open(f"{mnt}/ublkb3/stats.json", "rb") as f:
        first = f.read(10)
        rec(s, 0, 1, WRITE, 0)
        rest = f.read()
    assert json.loads(first + rest)["ops"]["write"]["ios"] == 0
    assert json.loads(read(f"{mnt}/ublkb3/stats.json"))["ops"]["write"]["ios"] == 1


# -- devices coming and going --------------------------------------------------
def test_devices_appear_and_vanish(mnt, source, shm_dir):
    f = open(f"{mnt}/ublkb5/stats.json", "rb")
    source.remove(5)
    assert os.listdir(mnt) == ["metrics", "ublkb3"]
    assert errno_of(os.stat, f"{mnt}/ublkb5") == errno.ENOENT
    assert errno_of(read, f"{mnt}/ublkb5/stats") == errno.ENOENT
    # what was opened before reads its snapshot to the end
    assert json.loads(f.read())["device"] == "5"
    f.close()
    s = shm_mod.create(9, nr_queues=1, depth=4, records=16, pid=os.getpid())
    try:
        source.add(9, s)
        assert sorted(os.listdir(mnt)) == ["metrics", "ublkb3", "ublkb9"]
        assert json.loads(read(f"{mnt}/ublkb9/info.json"))["id"] == 9
    finally:
        source.remove(9)
        s.close()


def test_statistics_gone_but_entry_left(mnt, source):
    source.shms.pop(5)
    assert "ublkb5" in os.listdir(mnt)
    assert json.loads(read(f"{mnt}/ublkb5/info.json"))["id"] == 5
    assert errno_of(read, f"{mnt}/ublkb5/stats") in (errno.ENOENT, errno.EIO)
    assert errno_of(read, f"{mnt}/ublkb5/trace") in (errno.ENOENT, errno.EIO)


# -- writes --------------------------------------------------------------------
def test_writes(mnt):
    assert errno_of(os.open, f"{mnt}/ublkb3/stats", os.O_WRONLY) in (errno.EACCES, errno.EROFS)
    assert errno_of(os.open, f"{mnt}/ublkb3/info", os.O_RDWR | os.O_TRUNC) in (errno.EACCES, errno.EROFS)
    assert errno_of(os.truncate, f"{mnt}/ublkb3/stats", 0) in (errno.EACCES, errno.EROFS)
    assert errno_of(os.mkdir, f"{mnt}/ublkb3/x") in (errno.EACCES, errno.EROFS)
    assert errno_of(os.open, f"{mnt}/ublkb3/new", os.O_WRONLY | os.O_CREAT, 0o644) in (errno.EACCES, errno.EROFS)
    assert errno_of(os.unlink, f"{mnt}/ublkb3/info") in (errno.EACCES, errno.EROFS)
    assert b"no fault rules" in read(f"{mnt}/ublkb3/faults")


def test_faults_file(mnt, source):
    path = f"{mnt}/ublkb3/faults"
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        assert errno_of(os.write, fd, b"op=write error=EIO\n") == errno.EINVAL
    finally:
        os.close(fd)
    # the reason for EINVAL is in the listing (and the server's log)
    assert b"# last rejected line: 'op=write error=EIO': column 1: unknown action 'op=write'" in read(path)
    # the shell's way: `echo rule > faults`, one line or several in one write
    r = subprocess.run(["sh", "-c", f"/bin/echo 'delay 5ms op=write' > {path}"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with open(path, "w") as f:
        f.write("fail lba 2048..4095 op=read errno=ENOSPC\n# a comment\n\nseed 42\n")
    text = read(path).decode()
    assert "seed 42" in text and "last rejected" not in text
    assert "delay 5ms op=write\n" in text and "fail op=read lba=2048..4095 errno=ENOSPC\n" in text
    # the rules are live in the device's shared memory: the queue-side matcher sees them
    s = source.shms[3]
    write, read_op = lib.UBLK_IO_OP_WRITE, lib.UBLK_IO_OP_READ
    assert lib.us_fault_eval(s.base, 0, 1, write, 0, 8) & 0xff == lib.US_FA_DELAY
    assert lib.us_fault_eval(s.base, 0, 1, read_op, 4095, 8) & 0xff == lib.US_FA_FAIL
    assert lib.us_fault_eval(s.base, 0, 1, read_op, 4096, 8) == 0
    r = subprocess.run(["sh", "-c", f"/bin/echo 'torn op=read' > {path}"], capture_output=True, text=True)
    assert r.returncode != 0 and "Invalid argument" in r.stderr
    assert "torn applies to writes only" in read(path).decode()
    # clear one, then all; no newline at the end still counts as a line
    with open(path, "w") as f:
        f.write("clear 1")
    assert "delay 5ms op=write\n" not in read(path).decode() and "fail op=read" in read(path).decode()
    with open(path, "w") as f:
        f.write("clear\n")
    assert "no fault rules" in read(path).decode()
    assert lib.us_fault_eval(s.base, 0, 1, read_op, 4095, 8) == 0
    # everything else written there is refused with the reason in the listing
    for data, reason in [(b"clear abc\n", "RULE: 'abc' is not a whole number"),
                         (b"seed x\n", "seed: 'x' is not a whole number"),
                         (b"\xff\xfe\n", "not UTF-8 text")]:
        fd = os.open(path, os.O_WRONLY)
        try:
            assert errno_of(os.write, fd, data) == errno.EINVAL
        finally:
            os.close(fd)
        assert reason in read(path).decode(), data
    fd = os.open(path, os.O_WRONLY)
    try:
        # a line that never ends is not buffered without bound
        assert errno_of(os.write, fd, b"#" * (tree_ops.MAX_FAULT_WRITE + 1)) == errno.EFBIG
    finally:
        os.close(fd)
    assert "no fault rules" in read(path).decode()


# -- trace ---------------------------------------------------------------------
def _reader(fd, out: queue.Queue):
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError as e:
            out.put(e)
            return
        out.put(data)
        if not data:
            return


def _lines_until(out, n, timeout=5.0):
    lines, buf = [], b""
    deadline = time.monotonic() + timeout
    while len(lines) < n:
        left = deadline - time.monotonic()
        assert left > 0, f"only {lines} after {timeout}s"
        try:
            item = out.get(timeout=left)
        except queue.Empty:
            continue
        assert not isinstance(item, BaseException), item
        buf += item
        *done, buf = buf.split(b"\n")
        lines += [d.decode() for d in done]
    assert buf == b"", "a read returned a partial line"
    return lines


@pytest.mark.parametrize("argv", [["head", "-n", "2"], ["tail", "-c", "+1", "-f"]])
def test_trace_reads_like_trace_pipe_for_head_and_tail(mnt, source, argv):
    s = source.shms[3]
    p = subprocess.Popen([*argv, f"{mnt}/ublkb3/trace"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        time.sleep(0.3)
        for i in range(3):
            rec(s, 0, i, WRITE, 8 * i)
        if argv[0] == "head":
            out, err = p.communicate(timeout=10)
            lines = out.splitlines()
            assert p.returncode == 0 and len(lines) == 2 and all(b" write " in x for x in lines), (out, err)
        else:
            # tail keeps following (its output waits in its stdio buffer while stdout is a pipe)
            time.sleep(1)
            assert p.poll() is None, p.stderr.read()
            p.kill()
            err = p.communicate(timeout=10)[1]
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate(timeout=10)
    assert b"Illegal seek" not in err


def test_trace_streams_records_made_after_open(mnt, source, trees):
    s = source.shms[3]
    rec(s, 0, 1, READ, 111)  # before the open: not shown
    fd = os.open(f"{mnt}/ublkb3/trace", os.O_RDONLY)
    out = queue.Queue()
    t = threading.Thread(target=_reader, args=(fd, out), daemon=True)
    try:
        t.start()
        time.sleep(0.2)
        assert out.empty(), "trace returned before anything happened"
        rec(s, 0, 2, WRITE, 2048)
        rec(s, 1, 3, READ, 4096, nr=16)
        rec(s, 1, 4, WRITE, 8192, result=-errno.EIO)
        lines = _lines_until(out, 3)
        fields = [line.split() for line in lines]
        assert sorted((f[1], f[3], f[5]) for f in fields) == [
            ("q0", "write", "2048+8"), ("q1", "read", "4096+16"), ("q1", "write", "8192+8")]
        assert any(f[-1] == "-EIO" for f in fields)
        # the stream goes on
        rec(s, 0, 5, FLUSH, 0, nr=0, result=0)
        assert _lines_until(out, 1)[0].split()[3] == "flush"
        assert os.fstat(fd).st_size == 0
    finally:
        os.close(fd)  # the reader thread ends when the mount goes away
    assert len([h for h in trees[0].handles.values() if h.kind == "trace"]) <= 1


def test_a_line_that_ends_with_the_file_is_checked_like_any_other(mnt, source, monkeypatch):
    """`printf 'fail size=1.5e400k' > faults` (no newline): the line is applied when the
    file is closed; its error reaches close(), and the tree (and the server) stay up."""
    path = f"{mnt}/ublkb3/faults"
    for line, reason in [(b"fail size=1.5e400k", "'1.5e400k' is not a size"),
                         (b"fail lba=" + b"9" * 30, "lba"),
                         (b"delay " + b"9" * 40 + b"s", "is not a duration"),
                         (b"seed 99999999999999999999999", "seed: '99999999999999999999999' is out of range")]:
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.write(fd, line)
        assert errno_of(os.close, fd) == errno.EINVAL, line
        assert reason in read(path).decode(), (line, read(path))
    # a bug in a handler is EIO for that request, never the end of the tree
    def boom(dev, line):
        raise OverflowError("a bug")

    monkeypatch.setattr(tree_ops, "apply_fault_line", boom)
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    os.write(fd, b"fail op=read")
    assert errno_of(os.close, fd) == errno.EIO
    assert "ublkb3" in os.listdir(mnt) and b"no fault rules" in read(path)


@pytest.mark.skipif(not shutil.which("setpriv"), reason="needs setpriv (util-linux)")
def test_a_user_who_is_not_root_cannot_enter_the_tree(source, trees):
    # on a path everyone may traverse, so that only the mount itself can say no: it is mounted
    # without allow_other, and the kernel refuses everyone but root before we see a request
    top = f"/dev/shm/ublkshell-tree-test-{os.getpid()}"
    os.makedirs(top, mode=0o755)
    os.chmod(top, 0o755)
    mp = os.path.join(top, "mnt")
    t = TreeThread(mp, source)
    try:
        t.start_and_wait()
        assert "ublkb3" in os.listdir(mp)
        for argv in (["ls", mp], ["cat", f"{mp}/ublkb3/stats"], ["sh", "-c", f"echo clear > {mp}/ublkb3/faults"]):
            p = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv],
                               capture_output=True, text=True, timeout=30)
            assert p.returncode != 0 and "Permission denied" in p.stderr, (argv, p.stderr)
        p = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "ls", top],
                           capture_output=True, text=True, timeout=30)
        assert p.returncode == 0 and "mnt" in p.stdout, p.stderr  # the path itself was open to them
        t.stop()
    finally:
        _force_unmount(mp)
        subprocess.run(["rm", "-rf", top])


def test_every_request_handler_is_guarded():
    import inspect

    import pyfuse3

    handlers = [n for n, fn in vars(fusetree.StatsTree).items()
                if inspect.iscoroutinefunction(fn) and hasattr(pyfuse3.Operations, n)]
    assert {"lookup", "read", "write", "flush", "release", "forget", "statfs"} <= set(handlers)
    assert all(hasattr(getattr(fusetree.StatsTree, n), "__wrapped__") for n in handlers)


def read_within(fd, size, timeout=5.0):
    """os.read that cannot wedge the test when the tree fails to answer."""
    out = queue.Queue()
    threading.Thread(target=lambda: out.put(_try(os.read, fd, size)), daemon=True).start()
    try:
        got = out.get(timeout=timeout)
    except queue.Empty:
        pytest.fail(f"no answer to a read within {timeout}s")
    if isinstance(got, OSError):
        raise got
    return got


def _try(fn, *args):
    try:
        return fn(*args)
    except OSError as e:
        return e


def test_trace_reports_lost_records_and_fits_the_buffer(mnt, source):
    s = source.shms[3]  # 16 records per queue
    fd = os.open(f"{mnt}/ublkb3/trace", os.O_RDONLY)
    try:
        # seeking is allowed (head and tail seek) and changes nothing: the stream reads on.
        # Checked first: a blocked read holds the file position lock
        assert os.lseek(fd, 0, os.SEEK_SET) == 0
        for i in range(40):
            rec(s, 0, i % 16, WRITE, i)
        data = read_within(fd, 300)
        assert data.endswith(b"\n") and len(data) <= 300
        lines = data.decode().splitlines()
        assert lines[0] == "# 24 records lost"
        while len(lines) < 17:
            chunk = read_within(fd, 300)
            assert chunk.endswith(b"\n") and len(chunk) <= 300
            lines += chunk.decode().splitlines()
        assert [int(line.split()[5].split("+")[0]) for line in lines[1:]] == list(range(24, 40))
    finally:
        os.close(fd)


def test_trace_follows_a_restarted_daemon(mnt, source, tmp_path, monkeypatch):
    fd = os.open(f"{mnt}/ublkb5/trace", os.O_RDONLY)
    out = queue.Queue()
    threading.Thread(target=_reader, args=(fd, out), daemon=True).start()
    try:
        rec(source.shms[5], 0, 1, READ, 10)
        assert _lines_until(out, 1)[0].split()[5] == "10+8"
        # what the server's source does when the stats file is replaced
        monkeypatch.setenv("UBLKSHELL_DATA_DIR", str(tmp_path / "shm2"))
        fresh = shm_mod.create(5, nr_queues=1, depth=8, records=64, pid=os.getpid())
        _previous, source.shms[5] = source.shms[5], fresh  # keep the old mapping alive
        rec(fresh, 0, 2, WRITE, 20)
        lines = _lines_until(out, 2)
        assert lines[0] == "# statistics restarted"
        assert lines[1].split()[5] == "20+8"
        # a daemon that lays out the same file again
        w = shm_mod.Shm(fresh.path, writable=True)
        w.hdr.created_mono_ns = lib.us_now_ns()
        w.close()
        assert _lines_until(out, 1) == ["# statistics restarted"]
        rec(fresh, 0, 3, WRITE, 30)
        # the ring is read again from its start (a real re-layout would have emptied it)
        assert [line.split()[5] for line in _lines_until(out, 2)] == ["20+8", "30+8"]
    finally:
        os.close(fd)


def test_trace_json_is_the_same_stream_as_objects(mnt, source, tmp_path, monkeypatch):
    from ublkshell.observe import schema

    s = source.shms[3]  # 16 records per queue
    fd = os.open(f"{mnt}/ublkb3/trace.json", os.O_RDONLY)
    out = queue.Queue()
    threading.Thread(target=_reader, args=(fd, out), daemon=True).start()
    try:
        time.sleep(0.2)  # the reader waits in the tree before the records come
        for i in range(20):
            rec(s, 0, i % 16, WRITE, i, lat=2000)
        lines = [json.loads(x) for x in _lines_until(out, 17)]
        assert schema.check("trace_lost", lines[0]) == {"device": "3", "lost": 4}
        for r in lines[1:]:
            schema.check("trace_record", r)
        assert [(r["device"], r["sector"], r["op"], r["fault"]) for r in lines[1:]] == [
            ("3", i, "write", None) for i in range(4, 20)]
        # what the server's source does when the stats file is replaced
        monkeypatch.setenv("UBLKSHELL_DATA_DIR", str(tmp_path / "shm2"))
        fresh = shm_mod.create(3, nr_queues=2, depth=16, records=16, pid=os.getpid())
        _previous, source.shms[3] = source.shms[3], fresh  # keep the old mapping alive
        rec(fresh, 1, 2, READ, 20)
        restarted, r = [json.loads(x) for x in _lines_until(out, 2)]
        assert schema.check("trace_restarted", restarted) == {"device": "3", "restarted": True}
        assert (r["queue"], r["op"], r["sector"]) == (1, "read", 20)
    finally:
        os.close(fd)


def test_trace_of_a_vanished_device_says_eio(mnt, source):
    fd = os.open(f"{mnt}/ublkb5/trace", os.O_RDONLY)
    out = queue.Queue()
    threading.Thread(target=_reader, args=(fd, out), daemon=True).start()
    try:
        time.sleep(0.2)
        source.remove(5)
        got = out.get(timeout=5)
        assert isinstance(got, OSError) and got.errno in (errno.EIO, errno.ENOENT)
    finally:
        os.close(fd)
    # and the loop lives on
    assert os.listdir(mnt) == ["metrics", "ublkb3"]


@pytest.mark.parametrize("argv", [["cat"], [sys.executable, "-c", "import sys; open(sys.argv[1]).read()"]],
                         ids=["cat", "python"])
def test_ctrl_c_ends_a_blocked_trace_read(mnt, trees, argv):
    path = f"{mnt}/ublkb3/trace"
    # a test run from a background job hands SIGINT down ignored: give the reader the default
    p = subprocess.Popen(argv + [path], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 5
        while not any(h.kind == "trace" for h in trees[0].handles.values()):
            assert time.monotonic() < deadline, "the reader never opened trace"
            time.sleep(0.02)
        time.sleep(0.3)  # well into the blocked read
        assert p.poll() is None
        p.send_signal(signal.SIGINT)
        p.wait(timeout=5)
        assert p.returncode != 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
    # its handle goes with it, and the tree still answers
    deadline = time.monotonic() + 5
    while trees[0].handles:
        assert time.monotonic() < deadline, trees[0].handles
        time.sleep(0.02)
    assert "ublkb3" in os.listdir(mnt)


# -- mounting ------------------------------------------------------------------
STANDALONE = """
import sys, trio
from ublkshell.bridge.tree.mount import run_tree
class Source:
    def devices(self):
        return {}
    def shm(self, dev_id):
        return None
trio.run(run_tree, sys.argv[1], Source())
"""


def _mount_and_kill(mp):
    p = subprocess.Popen([sys.executable, "-c", STANDALONE, mp], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not fusetree.is_mounted(mp):
            assert p.poll() is None, p.stderr.read()
            assert time.monotonic() < deadline, "the subprocess did not mount"
            time.sleep(0.05)
        assert os.listdir(mp) == ["metrics"]
    finally:
        p.kill()
        p.wait(10)
    assert errno_of(os.stat, mp) == errno.ENOTCONN


def test_unmount_stale_after_the_daemon_was_killed(tmp_path, source, trees):
    mp = str(tmp_path / "mnt")
    try:
        _mount_and_kill(mp)
        assert mounts.detach_dead(mp) is True
        assert not fusetree.is_mounted(mp) and os.listdir(mp) == []
        assert mounts.detach_dead(mp) is False  # nothing left to do
        # run_tree does the same by itself on a dead mount
        _mount_and_kill(mp)
        t = TreeThread(mp, source)
        t.start_and_wait()
        try:
            assert sorted(os.listdir(mp)) == ["metrics", "ublkb3", "ublkb5"]
        finally:
            t.stop()
        assert not fusetree.is_mounted(mp)
    finally:
        _force_unmount(mp)
        _force_unmount(mp)


def test_mount_refuses_a_live_mount_and_creates_its_directory(tmp_path, source, mnt):
    t = TreeThread(mnt, source)
    t.start()
    t.ready.wait(10)
    t.join(10)
    leaves = t.error.exceptions if isinstance(t.error, BaseExceptionGroup) else [t.error]
    assert any("already mounted" in str(e) for e in leaves), t.error
    assert fusetree.is_mounted(mnt) and "ublkb3" in os.listdir(mnt)


def test_unmount_stale_leaves_healthy_paths_alone(tmp_path):
    assert mounts.detach_dead(str(tmp_path)) is False
    assert mounts.detach_dead(str(tmp_path / "missing")) is False


def test_bad_mountpoints_are_one_line_errors(tmp_path, source):
    f = tmp_path / "file"
    f.write_text("")
    for mp in (str(f), str(f / "below")):
        with pytest.raises(fusetree.UblkError) as e:
            trio.run(fusetree.run_tree, mp, source)
        assert mp in str(e.value) and "\n" not in str(e.value)
    assert not fusetree._active
