"""The C recording code (counters, histograms, record rings) through cffi, on a
real shared-memory file: what every reader of a device's statistics relies on."""
import os
import random

import pytest

from ublkshell._native import lib
from ublkshell.observe import shm as shm_mod
from ublkshell.observe.stats import inflight, percentile, snapshot, summarize
from ublkshell.errors import UsageError
from ublkshell.observe.trace import Cursor, Filter, follow

READ, WRITE, FLUSH = lib.UBLK_IO_OP_READ, lib.UBLK_IO_OP_WRITE, lib.UBLK_IO_OP_FLUSH


@pytest.fixture
def shm(tmp_path, monkeypatch):
    monkeypatch.setenv("UBLKSHELL_DATA_DIR", str(tmp_path))
    s = shm_mod.create(7, nr_queues=2, depth=32, records=16, pid=1234)
    yield s
    s.close()


def test_histogram_buckets_cover_every_value_with_3_percent_precision():
    rng = random.Random(1)
    values = [0, 1, 31, 32, 33, 63, 64, 1000, 10**6, 10**9, 10**11] + [rng.randrange(1, 10**11) for _ in range(2000)]
    for v in values:
        b = lib.us_hist_bucket(v)
        lo, hi = lib.us_hist_low(b), lib.us_hist_low(b + 1)
        assert lo <= v < hi, (v, b, lo, hi)
        if v >= 1000:
            assert (hi - lo) / lo <= 1 / 32 + 1e-9
    assert lib.us_hist_bucket(2**60) == lib.US_HIST_BUCKETS - 1


def test_counters_and_percentiles(shm):
    for i in range(100):
        lib.us_shm_record_io(shm.base, i % 2, i % 32, WRITE, i * 8, 8, 4096, (i + 1) * 1000)
    lib.us_shm_record_io(shm.base, 0, 3, READ, 0, 8, -5, 50_000)
    lib.us_shm_record_io(shm.base, 1, 4, FLUSH, 0, 0, 0, 2_000)
    snap = snapshot(shm)
    w = summarize(snap["ops"]["write"])
    assert w["ios"] == 100 and w["bytes"] == 100 * 4096 and w["errors"] == 0
    assert 100_000 <= w["max_ns"] < 101_000  # the recorded lag plus the call itself
    assert abs(w["p50_ns"] - 50_000) / 50_000 < 0.04
    assert abs(w["p99_ns"] - 99_000) / 99_000 < 0.04
    r = summarize(snap["ops"]["read"])
    assert r["ios"] == 1 and r["errors"] == 1 and r["bytes"] == 0
    assert summarize(snap["ops"]["flush"])["ios"] == 1
    assert [q["ops"]["write"]["ios"] for q in snap["queues"]] == [50, 50]
    assert snap["inflight"] == 0 and inflight(shm) == []


def test_percentiles_never_pass_the_max():
    # one IO of 561 ns: its bucket's midpoint is above it, and no percentile may be
    hist = [0] * lib.US_HIST_BUCKETS
    hist[lib.us_hist_bucket(561)] = 1
    assert percentile(hist, 99) > 561
    s = summarize({"ios": 1, "bytes": 0, "errors": 0, "lat_sum_ns": 561, "lat_max_ns": 561, "hist": hist})
    assert s["p50_ns"] == s["p90_ns"] == s["p99_ns"] == s["p999_ns"] == s["max_ns"] == 561


def test_percentile_of_empty_histogram_is_zero():
    assert percentile([0] * 10, 99) == 0


def test_cursor_sees_records_in_order_and_counts_what_it_lost(shm):
    tail = Cursor(shm)
    for i in range(10):
        lib.us_shm_record_io(shm.base, 0, i, WRITE, 100 + i, 8, 4096, 10)
    got = tail.poll()
    assert [r["sector"] for r in got] == list(range(100, 110))
    assert all(r["queue"] == 0 and r["op"] == "write" and r["result"] == 4096 for r in got)
    assert tail.lost == 0
    # the ring holds 16: writing 40 more while the reader sleeps loses 24
    for i in range(40):
        lib.us_shm_record_io(shm.base, 0, i % 32, READ, i, 8, 4096, 10)
    got = tail.poll()
    assert tail.lost == 24
    assert [r["sector"] for r in got] == list(range(24, 40))
    assert tail.poll() == []


def test_follow_reports_lost_records_when_ctrl_c_ends_it(shm):
    for i in range(5):
        lib.us_shm_record_io(shm.base, 0, i, WRITE, i, 8, 4096, 10)
    seen = []

    def slow_reader(rec):
        seen.append(rec["sector"])
        if len(seen) == 1:
            # the device races 40 records ahead of a reader still busy printing
            for i in range(40):
                lib.us_shm_record_io(shm.base, 0, i % 32, READ, 100 + i, 8, 4096, 10)
        if len(seen) == 7:
            raise KeyboardInterrupt

    assert follow(shm, Filter.parse([]), slow_reader, from_start=True, interval=0) == 24
    assert seen == [0, 1, 2, 3, 4, 124, 125]


def test_filters():
    rec = {"queue": 1, "tag": 5, "op": "write", "sector": 2048, "sectors": 8, "lat_ns": 2_000_000, "result": -5}
    assert Filter.parse(["q=1", "tag=5", "op=write", "lba=2050..3000", "min_lat=1ms", "errors"]).match(rec)
    assert not Filter.parse(["q=0"]).match(rec)
    assert not Filter.parse(["lba=0..2047"]).match(rec)
    assert Filter.parse(["lba=2055"]).match(rec)
    assert not Filter.parse(["min_lat=3ms"]).match(rec)
    assert not Filter.parse(["errors"]).match(dict(rec, result=4096))
    # several ops, as fault rules take them
    assert Filter.parse(["op=flush,write"]).match(rec) and not Filter.parse(["op=read,flush"]).match(rec)
    with pytest.raises(UsageError, match="'wrote' is not an op"):
        Filter.parse(["op=write,wrote"])


def test_shm_survives_reopen_by_a_reader(shm, tmp_path):
    lib.us_shm_record_io(shm.base, 1, 2, WRITE, 8, 8, 4096, 10)
    reader = shm_mod.open_device(7)
    assert reader.nr_queues == 2 and reader.depth == 32
    assert snapshot(reader)["ops"]["write"]["ios"] == 1
    reader.close()


def test_a_failed_create_leaves_no_temporary_file(tmp_path, monkeypatch):
    """The statistics file is made under a private temporary name and renamed into place:
    whatever fails on the way, nothing is left beside it."""
    from ublkshell.errors import UblkError

    d = tmp_path / "data"
    monkeypatch.setenv("UBLKSHELL_DATA_DIR", str(d))
    for bad in (dict(records=3), dict(records=1 << 30), dict(nr_queues=0), dict(depth=5000)):
        args = dict(nr_queues=1, depth=8, records=16, pid=1) | bad
        with pytest.raises(UblkError):
            shm_mod.create(9, **args)
        assert not d.exists() or os.listdir(d) == [], (bad, os.listdir(d))
