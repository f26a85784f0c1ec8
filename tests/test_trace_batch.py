"""us_rec_read_batch, the one C reader of the record rings, against the per-record
reader it replaced: the same records, the same lost counts, and no trust in a
header rewritten after the check."""
import random

import pytest

from ublkshell._native import ffi, lib
from ublkshell.errors import UblkError
from ublkshell.observe import shm as shm_mod
from ublkshell.observe.trace import Cursor, Filter, Follow

WRITE = lib.UBLK_IO_OP_WRITE


@pytest.fixture
def shm(tmp_path, monkeypatch):
    monkeypatch.setenv("UBLKSHELL_DATA_DIR", str(tmp_path))
    s = shm_mod.create(5, nr_queues=3, depth=8, records=16, pid=1)
    yield s
    s.close()


def per_record(s, cursors, lost):
    """The reader before the batch call: one us_rec_read per record (sectors, lost)."""
    rec, out = ffi.new("struct us_rec *"), []
    for q in range(s.nr_queues):
        head, seq = lib.us_rec_head(s.base, q), cursors[q]
        if head - seq > s.rec_entries:
            lost[0] += head - s.rec_entries - seq
            seq = head - s.rec_entries
        while seq < head:
            rc = lib.us_rec_read(s.base, q, seq, rec)
            if rc == 1:
                out.append((q, rec.start_sector))
            elif rc < 0:
                lost[0] += 1
            seq += 1
        cursors[q] = seq
    return out


def test_batch_reads_what_the_per_record_reader_read_with_the_same_losses(shm):
    rng = random.Random(3)
    old_cursors, old_lost = [0] * 3, [0]
    cur = Cursor(shm, batch=5)
    sector = 0
    for _ in range(200):
        for _ in range(rng.choice((0, 1, 4, 15, 16, 17, 40))):
            q = rng.randrange(3)
            lib.us_shm_record_io(shm.base, q, rng.randrange(8), WRITE, sector, 8, 4096, 10)
            sector += 1
        want = per_record(shm, old_cursors, old_lost)
        got = cur.poll()
        assert sorted(want) == sorted((r["queue"], r["sector"]) for r in got)
        assert cur.lost == old_lost[0]
    assert cur.lost > 0


def test_a_record_torn_under_the_reader_is_lost_not_shown(shm):
    for i in range(4):
        lib.us_shm_record_io(shm.base, 0, i, WRITE, i, 8, 4096, 10)
    recs = ffi.cast("struct us_rec *", ffi.cast("char *", lib.us_shm_queue(shm.base, 0))
                    + shm.hdr.queue_stride - shm.rec_entries * ffi.sizeof("struct us_rec"))
    recs[2].seq = 0  # what a writer mid-copy leaves
    cursor, lost = ffi.new("uint64_t *", 0), ffi.new("uint64_t *", 0)
    out = ffi.new("struct us_rec[]", 16)
    assert lib.us_rec_read_batch(shm.base, shm.size, 0, cursor, out, 16, lost) == 3
    assert [out[i].start_sector for i in range(3)] == [0, 1, 3]
    assert cursor[0] == 4 and lost[0] == 1


def test_max_bounds_one_call_and_the_cursor_carries_on(shm):
    for i in range(10):
        lib.us_shm_record_io(shm.base, 1, 0, WRITE, i, 8, 4096, 10)
    cursor, lost = ffi.new("uint64_t *", 0), ffi.new("uint64_t *", 0)
    out = ffi.new("struct us_rec[]", 4)
    seen = []
    while (n := lib.us_rec_read_batch(shm.base, shm.size, 1, cursor, out, 4, lost)) > 0:
        seen += [out[i].start_sector for i in range(n)]
    assert n == 0 and seen == list(range(10)) and lost[0] == 0
    # a head behind the cursor (a file laid out again) has nothing for it, and loses nothing
    cursor[0] = 99
    assert lib.us_rec_read_batch(shm.base, shm.size, 1, cursor, out, 4, lost) == 0
    assert cursor[0] == 99 and lost[0] == 0


def test_a_header_rewritten_after_the_check_is_refused_not_followed(shm):
    cursor, lost = ffi.new("uint64_t *", 0), ffi.new("uint64_t *", 0)
    out = ffi.new("struct us_rec[]", 4)
    for bad in (-1, 3):
        assert lib.us_rec_read_batch(shm.base, shm.size, bad, cursor, out, 4, lost) == -22
    cur = Cursor(shm)
    # a larger ring than was mapped: reading it would run past the mapping
    shm.hdr.rec_entries = 1 << 20
    assert lib.us_rec_read_batch(shm.base, shm.size, 0, cursor, out, 4, lost) == -22
    with pytest.raises(UblkError, match="changed its layout"):
        cur.poll()
    shm.hdr.rec_entries = 16
    assert lib.us_rec_read_batch(shm.base, shm.size - 1, 0, cursor, out, 4, lost) == -22
    assert lib.us_rec_read_batch(shm.base, shm.size, 0, cursor, out, 4, lost) == 0


def test_follow_stops_at_count_inside_a_batch(shm):
    for i in range(12):
        lib.us_shm_record_io(shm.base, i % 3, 0, WRITE, i, 8, 4096, 10)
    f = Follow(shm, Filter.parse(["q=1"]), count=3, from_start=True)
    assert [r["sector"] for r in f.poll()] == [1, 4, 7]
    assert f.done and f.poll() == []


def test_the_benchmark_compares_both_readers_on_one_file():
    import json
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).resolve().parent.parent / "bench" / "trace_read.py"
    p = subprocess.run([sys.executable, str(script), "--queues", "2", "--records", "64", "--rounds", "1",
                        "--json"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    for view in ("raw", "records"):
        assert got[view]["records"] == 128 and got[view]["ratio"] > 0


def test_a_reader_racing_a_writer_sees_only_whole_records_and_counts_the_rest(shm):
    """The seqlock under a live writer: cffi lets go of the GIL around each C call, so the
    writer thread and the batch reader really overlap (and lap each other in a 16-record ring)."""
    import threading

    total = 20000
    cur = Cursor(shm, batch=8)
    done = threading.Event()

    def writer():
        for i in range(total):
            lib.us_shm_record_io(shm.base, i % 3, i % 8, WRITE, i, i * 7 % 1000 + 1, i % 100000, 10)
        done.set()

    t = threading.Thread(target=writer)
    t.start()
    seen, last = 0, [-1, -1, -1]
    while True:
        finished = done.is_set()
        for r in cur.poll():
            i = r["sector"]
            # every field from one IO: a torn copy would mix two
            assert (r["sectors"], r["result"], r["tag"], r["queue"]) == (i * 7 % 1000 + 1, i % 100000, i % 8, i % 3)
            assert i > last[r["queue"]]
            last[r["queue"]] = i
            seen += 1
        if finished:
            break
    t.join()
    assert seen + cur.lost == total


def test_a_file_full_of_distinct_op_flags_cannot_grow_the_cursor_without_bound(shm):
    cur = Cursor(shm)
    for i in range(3000):
        lib.us_shm_record_io(shm.base, 0, 0, WRITE | (i << 8), i, 8, 4096, 10)
        if i % 16 == 15:
            got = cur.poll()
            assert [r["op"] for r in got] == ["write"] * 16
    assert len(cur._names) <= 1024
