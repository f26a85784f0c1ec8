"""A device's statistics file is input: whoever can write it picks every header
field, and the C readers follow the header's offsets. Every reader (the CLI,
the server, the stats tree) opens it through `Shm`, which must turn any file
that is not exactly what us_shm_init lays out into a one-line UblkError,
never a crash or a traceback."""
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from ublkshell._native import ffi, lib
from ublkshell.observe.shm import Shm
from ublkshell.errors import UblkError, UsageError
from ublkshell.observe.stats import inflight
from ublkshell.observe.trace import Cursor, Filter, format_record
from ublkshell.observe.render import render_inflight, render_stats
from ublkshell.observe.stats import stats_of

HDR = ffi.sizeof("struct us_shm_hdr")
WRITE = lib.UBLK_IO_OP_WRITE


def image(nr_queues=2, depth=4, records=16, ios=0) -> bytearray:
    """A file exactly as a daemon lays it out, with some IO in its rings and tags."""
    size = lib.us_shm_size(nr_queues, depth, records)
    buf = ffi.new("char[]", size)
    assert lib.us_shm_init(buf, size, nr_queues, depth, records, 3, 4321) == 0
    for i in range(ios):
        lib.us_shm_record_io(buf, i % nr_queues, i % depth, WRITE, 8 * i, 8, 4096, 1000 + i)
    tags = lib.us_shm_tags(buf, 0)
    tags[0].state, tags[0].op_flags, tags[0].t_start_ns = 1, WRITE, lib.us_now_ns()
    return bytearray(ffi.buffer(buf, size))


FIELDS = dict(ffi.typeof("struct us_shm_hdr").fields)


def width(field: str) -> int:
    return ffi.sizeof(FIELDS[field].type)


def put(data: bytearray, field: str, value: int) -> bytearray:
    """Write a header field as raw bytes, whatever the value: the file is anyone's to write."""
    off = ffi.offsetof("struct us_shm_hdr", field)
    data[off:off + width(field)] = (value % (1 << 8 * width(field))).to_bytes(width(field), "little")
    return data


def header(data: bytes, field: str) -> int:
    h = ffi.cast("struct us_shm_hdr *", ffi.from_buffer(bytes(data[:HDR])))
    return int(getattr(h, field))


def refusal(path) -> str:
    """The one line Shm raises for path, bounded in time: a reader must never wait."""
    def late(*_):
        raise AssertionError(f"opening {path} blocked")
    old = signal.signal(signal.SIGALRM, late)
    signal.alarm(5)
    try:
        with pytest.raises(UblkError) as e:
            Shm(str(path))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert not isinstance(e.value, UsageError)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: ")
    return msg


VALID = image()
SIZE = len(VALID)
QUEUE_OFF = header(VALID, "queue_off")
STRIDE = header(VALID, "queue_stride")
FAULT_OFF = header(VALID, "fault_off")

# (what is wrong, the file, what the one line must say)
CRAFTED = [
    ("queue_off far outside", put(bytearray(VALID), "queue_off", 1 << 40),
     f"queue_off 1099511627776, expected {QUEUE_OFF}"),
    ("queue_off inside but shifted", put(bytearray(VALID), "queue_off", QUEUE_OFF + 64),
     f"queue_off {QUEUE_OFF + 64}, expected {QUEUE_OFF}"),
    ("queue_stride", put(bytearray(VALID), "queue_stride", STRIDE * 4096),
     f"queue_stride {STRIDE * 4096}, expected {STRIDE}"),
    ("no queues", put(bytearray(VALID), "nr_queues", 0), "nr_queues 0, expected 1..4096"),
    ("2^30 queues", put(bytearray(VALID), "nr_queues", 1 << 30), "nr_queues 1073741824, expected 1..4096"),
    ("one queue more than the layout", put(bytearray(VALID), "nr_queues", 3),
     f"fault_off {FAULT_OFF}, expected {FAULT_OFF + STRIDE}"),
    ("depth 0", put(bytearray(VALID), "depth", 0), "depth 0, expected 1..4096"),
    ("depth 5000", put(bytearray(VALID), "depth", 5000), "depth 5000, expected 1..4096"),
    ("rec_entries not a power of two", put(bytearray(VALID), "rec_entries", 17),
     "rec_entries 17, expected a power of two in 16..16777216"),
    ("rec_entries below 16", put(bytearray(VALID), "rec_entries", 8),
     "rec_entries 8, expected a power of two in 16..16777216"),
    ("rec_entries 2^25", put(bytearray(VALID), "rec_entries", 1 << 25),
     "rec_entries 33554432, expected a power of two in 16..16777216"),
    ("fault_off outside", put(bytearray(VALID), "fault_off", 1 << 40),
     f"fault_off 1099511627776, expected {FAULT_OFF}"),
    ("fault_off zero", put(bytearray(VALID), "fault_off", 0), f"fault_off 0, expected {FAULT_OFF}"),
    ("hist_buckets", put(bytearray(VALID), "hist_buckets", 1024), "hist_buckets 1024, expected 1088"),
    ("hdr_size", put(bytearray(VALID), "hdr_size", 64), f"hdr_size 64, expected {HDR}"),
    ("version", put(bytearray(VALID), "version", 1), "version 1, expected 2"),
    ("magic", put(bytearray(VALID), "magic", 0x1234), "magic 0x1234, expected 0x316d68736b6c6275"),
    ("truncated by one byte", bytearray(VALID[:-1]), f"file size {SIZE - 1}, expected at least {SIZE}"),
    ("only the header", bytearray(VALID[:HDR]), f"file size {HDR}, expected at least {SIZE}"),
    ("half a header", bytearray(VALID[:HDR // 2]), f"file size {HDR // 2}, expected at least {HDR}"),
    ("empty", bytearray(), f"file size 0, expected at least {HDR}"),
]


@pytest.mark.parametrize("what,data,says", CRAFTED, ids=[c[0] for c in CRAFTED])
def test_a_crafted_file_is_one_line_naming_the_field(tmp_path, what, data, says):
    path = tmp_path / "ublkb3.stats"
    path.write_bytes(bytes(data))
    assert refusal(path) == f"{path}: not ublkshell statistics ({says})"


def test_a_file_that_is_not_a_regular_file_is_refused_without_opening_it(tmp_path):
    target = tmp_path / "real.stats"
    target.write_bytes(bytes(VALID))
    Shm(str(target)).close()  # the file itself is fine: only the way to it is not
    (tmp_path / "link.stats").symlink_to(target)
    os.mkdir(tmp_path / "dir.stats")
    os.mkfifo(tmp_path / "fifo.stats")
    assert refusal(tmp_path / "link.stats").endswith("(a symbolic link)")
    for name in ("dir.stats", "fifo.stats"):
        assert refusal(tmp_path / name).endswith("(not a regular file)")
    assert refusal("/dev/null").endswith("(not a regular file)")


def test_fault_rules_are_never_changed_through_a_symlink(tmp_path, monkeypatch):
    """The rule writers (faults, clear, seed, powercut) open the file for writing under a lock:
    that open must not follow a symlink planted where the statistics file should be."""
    from ublkshell.devices import paths
    from ublkshell.faults import table

    monkeypatch.setenv("UBLKSHELL_DATA_DIR", str(tmp_path / "data"))
    elsewhere = tmp_path / "elsewhere.stats"
    elsewhere.write_bytes(bytes(VALID))
    os.symlink(elsewhere, paths.stats_path(3, create=True))
    for change in (lambda: table.add(3, "fail op=write"), lambda: table.clear(3), lambda: table.rules(3)):
        with pytest.raises(UblkError, match=r"not ublkshell statistics \(a symbolic link\)$"):
            change()
    assert elsewhere.read_bytes() == bytes(VALID)


@pytest.mark.parametrize("writable", [False, True])
def test_only_the_checked_layout_is_mapped(tmp_path, writable):
    # a longer file is fine, but nothing past the layout is ever in reach of a reader
    path = tmp_path / "ublkb3.stats"
    path.write_bytes(bytes(VALID) + b"\xff" * 65536)
    s = Shm(str(path), writable=writable)
    assert s.size == SIZE and len(s.map) == SIZE
    s.close()


def test_the_fault_area_is_only_where_the_geometry_puts_it():
    # a header whose fault_off points at something that looks like a fault area elsewhere
    data = bytearray(VALID)
    bogus = QUEUE_OFF + 4096
    data[bogus:bogus + 8] = lib.US_FAULT_MAGIC.to_bytes(8, "little")
    put(data, "fault_off", bogus)
    buf = ffi.from_buffer(data)
    assert lib.us_shm_check(buf, len(data), ffi.NULL) < 0
    assert lib.us_fault_area_of(buf) == ffi.NULL
    assert lib.us_fault_area_of(ffi.from_buffer(bytearray(VALID))) != ffi.NULL


def test_us_shm_init_never_lays_out_what_readers_would_refuse():
    for q, d, r in ((0, 1, 16), (4097, 1, 16), (1, 0, 16), (1, 4097, 16), (1, 1, 17), (1, 1, 1 << 25)):
        assert lib.us_shm_size(q, d, r) == 0
        buf = ffi.new("char[]", HDR * 2)
        assert lib.us_shm_init(buf, HDR * 2, q, d, r, 0, 0) == -22  # EINVAL
    # the largest legal layout: every offset still far below 2^64
    assert lib.us_shm_size(4096, 4096, 1 << 24) < 1 << 43


def test_record_and_tag_fields_are_data(tmp_path):
    """A record's q_id, op, tag, fault and result are whatever the file says:
    shown, never used to look anything up, and a record is shown for the ring it sits in."""
    data = image(ios=1)
    path = tmp_path / "ublkb3.stats"
    path.write_bytes(bytes(data))
    s = Shm(str(path), writable=True)
    recs = ffi.cast("struct us_rec *", ffi.cast("char *", lib.us_shm_queue(s.base, 0))
                    + STRIDE - s.rec_entries * ffi.sizeof("struct us_rec"))
    r = recs[0]
    assert r.seq == 1
    r.q_id, r.tag, r.op_flags, r.fault, r.result = 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, -99999
    t = lib.us_shm_tags(s.base, 1)[3]
    t.state, t.op_flags, t.fault, t.t_start_ns = 7, 0xEE, 0xFFFFFF42, (1 << 64) - 1

    got = Cursor(s, from_start=True).poll()
    assert [x["queue"] for x in got] == [0]
    assert got[0]["op"] == "op255" and got[0]["tag"] == 0xFFFF
    assert Filter.parse(["q=0"]).match(got[0]) and not Filter.parse(["q=65535"]).match(got[0])
    line = format_record(got[0])
    assert " q0 " in line and "-99999" in line and "?#16777215" in line
    tags = inflight(s)
    assert [(x["queue"], x["tag"], x["op"], x["age_ns"]) for x in tags][1:] == [(1, 3, "op238", 0)]
    assert "?#16777215" in render_inflight({"device": 3, "tags": tags})
    assert render_stats(stats_of(3, s), queues=True).startswith("dev 3:")
    s.close()


# -- the whole command, as a user runs it ----------------------------------------------
def _cli_env(tmp_path) -> dict:
    env = dict(os.environ, UBLKSHELL_STATE_DIR=str(tmp_path / "run"), UBLKSHELL_DATA_DIR=str(tmp_path / "data"),
               UBLKSHELL_SOCKET=str(tmp_path / "run" / "none.sock"))
    env.pop("UBLKSHELL_DEBUG", None)
    return env


def _stats_path(env) -> str:
    """Where `stats 0` looks, asked of the code itself: the directory is not this test's business."""
    out = subprocess.run([sys.executable, "-c",
                          "from ublkshell.devices.paths import stats_path; print(stats_path(0, create=True))"],
                         env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


CLI_CASES = ["queue_off far outside", "2^30 queues", "truncated by one byte", "empty", "symlink", "fifo",
             "directory"]


@pytest.mark.parametrize("what", CLI_CASES)
def test_stats_on_a_crafted_file_prints_one_line_and_exits_1(tmp_path, what):
    env = _cli_env(tmp_path)
    path = _stats_path(env)
    if what == "symlink":
        with open(tmp_path / "elsewhere", "wb") as f:
            f.write(bytes(put(bytearray(VALID), "queue_off", 1 << 40)))
        os.symlink(tmp_path / "elsewhere", path)
    elif what == "fifo":
        os.mkfifo(path)
    elif what == "directory":
        os.mkdir(path)
    else:
        with open(path, "wb") as f:
            f.write(bytes(dict((c[0], c[1]) for c in CRAFTED)[what]))
    for verb in (["stats", "0"], ["inflight", "0"], ["lat", "0", "write"], ["trace", "0", "--count", "1"]):
        p = subprocess.run([sys.executable, "-m", "ublkshell", *verb], env=env, capture_output=True,
                           text=True, timeout=60)
        assert (p.returncode, p.stdout) == (1, ""), (verb, p.returncode, p.stderr)
        assert p.stderr.startswith(f"ublkshell: {path}: not ublkshell statistics (")
        assert p.stderr.count("\n") == 1, p.stderr


# -- any file at all --------------------------------------------------------------------
HEADER_FIELDS = [f for f in FIELDS if f != "reserved"]
BASES = {geo: bytes(image(*geo, ios=23)) for geo in ((1, 1, 16), (2, 3, 16), (1, 2, 32))}
INTERESTING = [0, 1, 2, 15, 16, 17, 63, 64, 128, 136, 192, 4095, 4096, 4097, 1 << 24, (1 << 24) + 1,
               1 << 31, (1 << 32) - 1, 1 << 40, (1 << 63), (1 << 64) - 1]


def _header_of(q, d, r) -> bytes:
    size = lib.us_shm_size(q, d, r)
    buf = ffi.new("char[]", size)
    assert lib.us_shm_init(buf, size, q, d, r, 9, 1) == 0
    return bytes(ffi.buffer(buf, HDR))


# consistent headers of other geometries: only the file's size can give them away
OTHER_LAYOUTS = [_header_of(q, d, r) for q in (1, 2, 3, 4) for d in (1, 2, 4, 8) for r in (16, 32, 64)]


def apply(plan: bytes) -> bytes:
    """A file from a plan of edits: hypothesis draws one byte string (one draw is far cheaper
    than the ~15 a structured strategy needs) and still shrinks it to a small failing plan.
    Plan: [base geometry] [length mode] [2 bytes of length] then edits of 10 bytes:
    [kind] [field, byte or layout] [8 bytes of value or offset]."""
    plan = plan + bytes(max(0, 4 - len(plan)))
    geos = sorted(BASES)
    data = bytearray(BASES[geos[plan[0] % len(geos)]])
    edits = plan[4:]
    for i in range(0, len(edits) - 9, 10):
        kind, pick, raw = edits[i] % 5, edits[i + 1], int.from_bytes(edits[i + 2:i + 10], "little")
        if kind <= 1:  # a header field: an interesting value or any
            field = HEADER_FIELDS[pick % len(HEADER_FIELDS)]
            put(data, field, INTERESTING[raw % len(INTERESTING)] if kind == 0 else raw)
        elif kind == 2:  # a consistent header of another geometry
            data[:HDR] = OTHER_LAYOUTS[pick % len(OTHER_LAYOUTS)]
        else:  # one byte, in the header or anywhere
            data[raw % (HDR if kind == 3 else len(data))] = pick
    # most files keep their length; the rest end near the layout's end or anywhere
    mode, n = plan[1], int.from_bytes(plan[2:4], "little")
    cut = None
    if 160 <= mode < 208:
        cut = max(0, len(data) + n % 257 - 128)
    elif mode >= 208:
        cut = n * (len(data) + 4096) // 65536
    if cut is not None:
        data = data[:cut] + bytearray(max(0, cut - len(data)))
    return bytes(data)


@pytest.fixture(scope="module")
def fuzz_path(tmp_path_factory):
    # tmpfs, where statistics files live, writes these 100-200 KiB files 5x faster than ext4
    if os.path.isdir("/dev/shm"):
        d = tempfile.mkdtemp(prefix="ublkshell-fuzz-", dir="/dev/shm")
        yield os.path.join(d, "ublkb9.stats")
        shutil.rmtree(d, ignore_errors=True)
    else:
        yield str(tmp_path_factory.mktemp("fuzz") / "ublkb9.stats")


# 2000 examples take 2-4 s. No deadline: a slow example on a busy CI host is not a bug;
# a crash, a stray exception or a file accepted that us_shm_check refuses is.
@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=st.binary(min_size=4 + 10, max_size=4 + 4 * 10))
def test_any_file_is_read_whole_or_refused_in_one_line(fuzz_path, plan):
    data = apply(plan)
    with open(fuzz_path, "wb") as f:
        f.write(data)
    accepts = bool(data) and lib.us_shm_check(ffi.from_buffer(data), len(data), ffi.NULL) == 0
    try:
        s = Shm(fuzz_path)
    except UblkError as e:
        assert not accepts and "\n" not in str(e)
        return
    assert accepts
    try:
        assert s.size == lib.us_shm_size(s.nr_queues, s.depth, s.rec_entries) <= len(data)
        counted = stats_of(9, s)
        assert len(counted["queues"]) == s.nr_queues
        render_stats(counted, queues=True)
        for t in inflight(s):
            assert 0 <= t["queue"] < s.nr_queues and 0 <= t["tag"] < s.depth
        for r in Cursor(s, from_start=True).poll():
            assert 0 <= r["queue"] < s.nr_queues
            format_record(r)
    finally:
        s.close()
