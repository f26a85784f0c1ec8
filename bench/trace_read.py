#!/usr/bin/env python3
"""How fast a trace reader empties a device's record rings: the per-record reader
(one us_rec_read per record, as every face read before) against the batch reader
(us_rec_read_batch, observe/trace.py's Cursor), on the same shared-memory file in
the same run, as records/s and their ratio.

No device and no root needed: the records are written by the recording code the
queue threads run (us_shm_record_io) into a statistics file in a temporary
directory. Run from the repository: .venv/bin/python bench/trace_read.py

Two views of each reader: "raw" copies records out of the rings only; "records"
also turns each into the dict every face emits (what `trace` pays per record).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ublkshell._native import ffi, lib  # noqa: E402
from ublkshell.observe import shm as shm_mod  # noqa: E402
from ublkshell.observe.names import flag_names, op_name  # noqa: E402
from ublkshell.observe.trace import Cursor  # noqa: E402

from common import positive_int  # noqa: E402


def fill(s, per_queue: int) -> None:
    for q in range(s.nr_queues):
        for i in range(per_queue):
            lib.us_shm_record_io(s.base, q, i % s.depth, lib.UBLK_IO_OP_WRITE, i * 8, 8, 4096, 1000 + i)


def old_reader(s, as_dicts: bool) -> int:
    """Every queue from its oldest record, one C call per record (the reader before)."""
    rec, n = ffi.new("struct us_rec *"), 0
    base_ns = int(s.hdr.created_mono_ns)
    out = []
    for q in range(s.nr_queues):
        head = lib.us_rec_head(s.base, q)
        seq = max(0, head - s.rec_entries)
        while seq < head:
            if lib.us_rec_read(s.base, q, seq, rec) == 1:
                n += 1
                if as_dicts:
                    r = rec
                    out.append({"t_ns": int(r.t_start_ns) - base_ns, "queue": q, "tag": int(r.tag),
                                "op": op_name(r.op_flags), "flags": flag_names(r.op_flags),
                                "sector": int(r.start_sector), "sectors": int(r.nr_sectors),
                                "lat_ns": int(r.lat_ns), "result": int(r.result), "fault": int(r.fault)})
            seq += 1
    if as_dicts:
        out.sort(key=lambda r: r["t_ns"] + r["lat_ns"])
    return n


def batch_raw(s, batch: int) -> int:
    buf, lost, n = ffi.new("struct us_rec[]", batch), ffi.new("uint64_t *"), 0
    cursor = ffi.new("uint64_t *")
    for q in range(s.nr_queues):
        cursor[0] = max(0, lib.us_rec_head(s.base, q) - s.rec_entries)
        while (got := lib.us_rec_read_batch(s.base, s.size, q, cursor, buf, batch, lost)) > 0:
            n += got
    return n


def batch_records(s, batch: int) -> int:
    return len(Cursor(s, from_start=True, batch=batch).poll())


def rate(fn, rounds: int) -> tuple[float, int]:
    """Median records/s over rounds (CPU time: a busy host slows both alike), and the records one round read."""
    samples, n = [], 0
    for _ in range(rounds):
        t = time.process_time()
        n = fn()
        samples.append(n / max(time.process_time() - t, 1e-9))
    return statistics.median(samples), n


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queues", type=positive_int, default=4, help="record rings (default 4)")
    p.add_argument("--records", type=positive_int, default=1 << 16,
                   help="records per ring, a power of two in 16..2^24 (default 65536)")
    p.add_argument("--batch", type=positive_int, default=256, help="records per batch call (default 256)")
    p.add_argument("--rounds", type=positive_int, default=5, help="reads of the full rings; the median counts")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    a = p.parse_args()
    if a.records < lib.US_REC_MIN or a.records > lib.US_REC_MAX or a.records & (a.records - 1):
        p.error(f"--records: a power of two in {lib.US_REC_MIN}..{lib.US_REC_MAX}")
    with tempfile.TemporaryDirectory(prefix="ublkshell-bench-") as d:
        os.environ["UBLKSHELL_DATA_DIR"] = d
        s = shm_mod.create(0, nr_queues=a.queues, depth=64, records=a.records, pid=os.getpid())
        try:
            fill(s, a.records)
            res = {}
            for view, old, new in (("raw", lambda: old_reader(s, False), lambda: batch_raw(s, a.batch)),
                                   ("records", lambda: old_reader(s, True), lambda: batch_records(s, a.batch))):
                old_rate, n_old = rate(old, a.rounds)
                new_rate, n_new = rate(new, a.rounds)
                if n_old != n_new:
                    print(f"trace_read: the readers disagree ({n_old} vs {n_new} records)", file=sys.stderr)
                    return 1
                res[view] = {"records": n_new, "per_record_per_s": round(old_rate),
                             "batch_per_s": round(new_rate), "ratio": round(new_rate / old_rate, 2)}
        finally:
            s.close()
    if a.json:
        print(json.dumps({"queues": a.queues, "records_per_ring": a.records, "batch": a.batch, **res},
                         sort_keys=True))
        return 0
    print(f"{a.queues} rings x {a.records} records, batch {a.batch}, median of {a.rounds}")
    print(f"{'VIEW':<8} {'PER-RECORD rec/s':>18} {'BATCH rec/s':>14} {'RATIO':>6}")
    for view, r in res.items():
        print(f"{view:<8} {r['per_record_per_s']:>18,} {r['batch_per_s']:>14,} {r['ratio']:>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
