"""The native fault engine on the host, through real shared memory and the queue
threads' own matcher (us_fault_eval): rule sets that land whole or not at all,
the C side's own checks of what it is given, and badblocks as ranges of any
length whose rewrites live in the fixed-size heal log."""
import os
import time

import pytest

from ublkshell._native import ffi, lib
from ublkshell.observe import shm as shm_mod
from ublkshell.errors import UblkError
from ublkshell.faults import grammar, table

READ, WRITE, FLUSH = lib.UBLK_IO_OP_READ, lib.UBLK_IO_OP_WRITE, lib.UBLK_IO_OP_FLUSH
WZ = lib.UBLK_IO_OP_WRITE_ZEROES
DEV = 12
TIB = 1 << 31  # sectors in a TiB


@pytest.fixture
def dev(tmp_path, monkeypatch):
    monkeypatch.setenv("UBLKSHELL_DATA_DIR", str(tmp_path))
    s = shm_mod.create(DEV, nr_queues=2, depth=16, records=16, pid=os.getpid())
    yield s
    s.close()


def ev(s, op, sector, sectors=8, q=0, tag=1):
    return grammar.fault_label(lib.us_fault_eval(s.base, q, tag, op, sector, sectors))


def bad(s, sector, sectors=1):
    """Does a read of these sectors fail?"""
    return ev(s, READ, sector, sectors).startswith("badblocks#")


def listing(rule_id):
    return next(r for r in table.rules(DEV)["rules"] if r["id"] == rule_id)


def n_rules(s):
    return lib.us_fault_list(s.base, ffi.NULL, ffi.NULL, 0)


# -- rule sets -----------------------------------------------------------------

def test_a_line_lands_whole_or_not_at_all(dev):
    # a bad range anywhere in the line: nothing of it is installed
    with pytest.raises(grammar.RuleError, match="out of range"):
        table.add(DEV, "badblocks 0 7 9223372036854775808")
    assert n_rules(dev) == 0
    ids = [r["id"] for r in table.add(DEV, "badblocks 0 7 100..199")]
    assert ids == [1, 2, 3] and n_rules(dev) == 3


def rule_struct(line):
    (rule,) = grammar.parse(line)
    r = ffi.new("struct us_fault_rule *")
    grammar.to_struct(rule, r)
    return r


U64 = (1 << 64) - 1


@pytest.mark.parametrize("base, field, value", [
    ("fail", "action", 0),
    ("fail", "action", 9),
    ("fail lba 5..7", "lba_lo", 8),                     # ends before it starts
    ("fail lba 5..7", "lba_hi", 1 << 63),              # hi + 1 would wrap
    ("fail", "lba_hi", 7),                             # a range without US_FM_LBA
    ("fail", "flags", 4),
    ("fail", "q", 4096),
    ("fail", "q", -2),
    ("fail", "tag", 4096),
    ("fail", "op_mask", 1 << 6),
    ("fail size=4k..8k", "size_lo", 16384),
    ("fail", "prob", (1 << 32) + 1),
    ("fail", "count", 0),
    ("fail", "count", -2),
    ("fail", "err", 4096),
    ("fail", "err", -5),
    ("corrupt", "byte", 4096),
    ("corrupt", "byte", -2),
    ("delay 1ms", "t_hi_ns", 61 * 10**9),
    ("delay 5ms", "t_lo_ns", 6 * 10**6),               # lo above hi
    ("flakey up=1s down=1s", "t_lo_ns", 0),
    ("flakey up=1s down=1s", "t_hi_ns", 25 * 3600 * 10**9),
    ("flakey up=1s down=1s", "arg", 2),
    ("badblocks 5", "flags", 0),                       # a range it does not say it has
    ("badblocks 5", "count", 1),                       # writes would stop healing
    ("badblocks 5", "prob", 1 << 31),
    ("badblocks 5", "op_mask", 1 << FLUSH),
])
def test_the_native_side_checks_every_rule(dev, base, field, value):
    r = rule_struct(base)
    assert lib.us_fault_add(dev.base, r) > 0  # the rule as the grammar makes it is fine
    setattr(r, field, value)
    assert lib.us_fault_add(dev.base, r) == -22  # EINVAL
    # in a set, one bad rule refuses the set
    rs = ffi.new("struct us_fault_rule[]", 3)
    rs[0] = rule_struct("fail lba 1")[0]
    rs[1] = r[0]
    rs[2] = rule_struct("fail lba 2")[0]
    assert lib.us_fault_add_set(dev.base, rs, 3, ffi.NULL) == -22
    assert n_rules(dev) == 1


def test_set_sizes_and_ids(dev):
    rs = ffi.new("struct us_fault_rule[]", 257)
    for i in range(257):
        rs[i] = rule_struct(f"fail lba {i}")[0]
    assert lib.us_fault_add_set(dev.base, rs, 0, ffi.NULL) == -22
    assert lib.us_fault_add_set(dev.base, rs, 257, ffi.NULL) == -22
    ids = ffi.new("uint32_t[]", 256)
    assert lib.us_fault_add_set(dev.base, rs, 256, ids) == 256 and list(ids) == list(range(1, 257))
    assert lib.us_fault_add_set(dev.base, rs, 1, ffi.NULL) == -28  # ENOSPC
    assert table.clear(DEV) == 256
    # ids are never reused, and a record holds 24 bits of one
    dev.fault_area().next_id = lib.US_FAULT_MAX_ID
    assert lib.us_fault_add_set(dev.base, rs, 2, ffi.NULL) == -34  # ERANGE, and nothing added
    assert n_rules(dev) == 0
    assert lib.us_fault_add(dev.base, rs) == lib.US_FAULT_MAX_ID
    with pytest.raises(UblkError, match="rule ids are used up"):
        table.add(DEV, "fail")


# -- badblocks: ranges and the heal log -----------------------------------------

def test_a_huge_range_is_one_rule_and_heals_exactly(dev):
    t = time.monotonic()
    (r,) = table.add(DEV, f"badblocks 0..{1 << 40}")
    assert time.monotonic() - t < 1
    assert n_rules(dev) == 1 and dev.fault_area().heal_used == 0
    assert bad(dev, 0) and bad(dev, 1 << 40) and not bad(dev, (1 << 40) + 1)
    assert bad(dev, 500 * TIB, 2048)
    assert ev(dev, WRITE, 1000, 8) == ""            # heals 1000..1007
    assert ev(dev, WRITE, 1008, 8) == ""            # touches it: the same run grows
    assert ev(dev, WZ, 990, 10) == ""               # below it, touching: grows down
    assert ev(dev, WRITE, 1004, 4) == ""            # already healed: nothing new
    assert dev.fault_area().heal_used == 1
    assert not bad(dev, 990, 26) and bad(dev, 989) and bad(dev, 1016) and bad(dev, 989, 27)
    # past the end of the range the write heals nothing beyond it
    assert ev(dev, WRITE, (1 << 40) - 3, 8) == ""
    assert not bad(dev, (1 << 40) - 3, 4)
    x = listing(r["id"])
    assert x["healed"] == 26 + 4 and x["heal_lost"] == 0 and x["text"] == f"badblocks 0..{1 << 40}"


def test_runs_in_any_order_cover_a_read_together(dev):
    table.add(DEV, "badblocks 0..99")
    for start in (80, 40, 0, 60, 20):                # five separate runs, newest first in the log
        assert ev(dev, WRITE, start, 10) == ""
    assert dev.fault_area().heal_used == 5
    assert bad(dev, 0, 100) and bad(dev, 10, 1) and not bad(dev, 0, 10)
    for start in (70, 50, 30, 10):                   # the gaps: runs grow into each other
        assert ev(dev, WRITE, start, 10) == ""
    assert not bad(dev, 0, 90) and bad(dev, 0, 100) and listing(1)["healed"] == 90
    assert ev(dev, WRITE, 90, 10) == ""
    assert not bad(dev, 0, 100) and not bad(dev, 95, 8)
    assert listing(1)["healed"] == 100


def test_each_rule_has_its_own_heals(dev):
    table.add(DEV, "badblocks 0..99 50..149")
    assert ev(dev, WRITE, 40, 20) == ""              # 40..59: rule 1 all of it, rule 2 50..59
    assert not bad(dev, 40, 20)
    assert bad(dev, 60) and bad(dev, 30)
    assert [listing(i)["healed"] for i in (1, 2)] == [20, 10]


def test_a_full_heal_log_says_what_it_forgot(dev):
    size = lib.US_HEAL_ENTRIES
    table.add(DEV, f"badblocks 0..{4 * size}")
    for i in range(size):                            # every other sector: one run each
        ev(dev, WRITE, 2 * i, 1)
    a = dev.fault_area()
    assert a.heal_used == size and listing(1)["heal_lost"] == 0
    assert ev(dev, WRITE, 3 * size, 4) == ""         # a new run: no room
    assert bad(dev, 3 * size) and listing(1)["heal_lost"] == 1
    assert ev(dev, WRITE, 1, 1) == ""                 # touching a run: that still grows
    assert not bad(dev, 0, 3)
    got = table.rules(DEV)
    assert got["heal_log"] == {"used": size, "size": size}
    assert got["rules"][0]["healed"] == size + 1 and got["rules"][0]["heal_lost"] == 1


def test_the_log_empties_when_the_last_badblocks_rule_goes(dev):
    a = dev.fault_area()
    table.add(DEV, "badblocks 0..99")
    table.add(DEV, "badblocks 200..299")
    table.add(DEV, "fail op=flush")
    ev(dev, WRITE, 0, 8)
    ev(dev, WRITE, 200, 8)
    assert a.heal_used == 2
    table.clear(DEV, 1)
    assert a.heal_used == 2                          # rule 2 still uses the log
    table.clear(DEV, 2)
    assert a.heal_used == 0
    # a new rule over the same sectors starts with nothing rewritten
    table.add(DEV, "badblocks 0..99")
    assert bad(dev, 0)


def test_a_queue_stuck_inside_the_log_keeps_it(dev):
    """A count left by a queue that died or stopped inside the log: the writer
    gives up emptying it after a second, and the dead rule's runs stay ignored."""
    a = dev.fault_area()
    table.add(DEV, "badblocks 0..99")
    ev(dev, WRITE, 0, 100)
    a.busy[5].n = 1
    t = time.monotonic()
    table.clear(DEV)
    assert 0.9 < time.monotonic() - t < 5
    assert a.heal_used == 1
    table.add(DEV, "badblocks 0..99")
    assert bad(dev, 0) and listing(2)["healed"] == 0
    a.busy[5].n = 0
    table.clear(DEV)
    assert a.heal_used == 0


def test_a_new_queue_thread_clears_its_stale_count(dev):
    a = dev.fault_area()
    a.busy[3].n = 7                                   # a killed daemon's queue 3
    lib.us_fault_eval(dev.base, 3, 0, READ, 0, 1)    # attaches as queue 3
    assert a.busy[3].n == 0


def test_queues_healing_at_once_remember_exactly_what_was_written(dev):
    """Four queue threads heal one rule at once (cffi lets go of the GIL inside
    the matcher): afterwards a sector reads iff it was written, and a sector
    nobody writes never reads, not even while the runs grow around it."""
    import random
    import threading

    n = 1 << 14
    table.add(DEV, f"badblocks 0..{n - 1}")
    never = set(range(0, n, 61))
    written = [set() for _ in range(4)]
    leaks = []
    done = threading.Event()

    def writer(q):
        rnd = random.Random(q)
        for _ in range(400):
            lo = rnd.randrange(n - 16)
            hi = lo + rnd.randrange(16)
            hole = next((s for s in never if lo <= s <= hi), None)
            if hole is not None:
                hi = hole - 1
                if hi < lo:
                    continue
            lib.us_fault_eval(dev.base, q, 0, WRITE, lo, hi - lo + 1)
            written[q].update(range(lo, hi + 1))

    def watcher():
        while not done.is_set():
            for s in never:
                if not lib.us_fault_eval(dev.base, 4, 0, READ, s, 1):
                    leaks.append(s)

    threads = [threading.Thread(target=writer, args=(q,)) for q in range(4)]
    w = threading.Thread(target=watcher)
    w.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    w.join()
    assert not leaks
    every = set().union(*written)
    assert not every & never
    assert [s for s in range(n) if bad(dev, s) == (s in every)] == []
    assert listing(1)["healed"] == len(every) and listing(1)["heal_lost"] == 0


def test_rules_crafted_in_the_file_are_listed_not_crashed_on(dev):
    """The rule table is part of a file readers treat as input: whatever a slot holds,
    `faults` lists it (the server and the stats tree call the same code)."""
    area = dev.fault_area()
    crafted = [(lib.US_FA_BAD, 0), (99, 0), (lib.US_FA_DELAY, 0xFF), (0xFFFFFFFF, 0xFFFFFFFF)]
    for slot, (action, flags) in enumerate(crafted):
        r = area.rules[slot]
        r.id, r.action, r.flags, r.q, r.tag = 100 + slot, action, flags, -1, -1
        r.lba_lo, r.lba_hi, r.t_lo_ns, r.t_hi_ns = 5, 3, 7, 1
        area.order[slot] = slot
    area.nr = len(crafted)
    listed = table.rules(DEV)["rules"]
    assert [x["id"] for x in listed] == [100, 101, 102, 103]
    assert listed[0]["text"].startswith("badblocks 5..3") and listed[1]["text"].startswith("?")
    assert all(isinstance(x["text"], str) and "\n" not in x["text"] for x in listed)
