"""The fault rule language and the native matcher, on the host (no device):
parse/describe round trips, one-line errors with the column, and which IO a
rule in real shared memory matches (us_fault_eval runs the queue threads' code)."""
import os

import pytest

from ublkshell._native import ffi, lib
from ublkshell.bridge import shm as shm_mod
from ublkshell.errors import UsageError
from ublkshell.faults import grammar, table

READ, WRITE, FLUSH = lib.UBLK_IO_OP_READ, lib.UBLK_IO_OP_WRITE, lib.UBLK_IO_OP_FLUSH


@pytest.mark.parametrize("line, text", [
    ("delay 5ms op=write", "delay 5ms op=write"),
    ("delay 1ms..50ms p=0.1", "delay 1ms..50ms p=0.1"),
    ("fail tag 3 errno=EIO count=1", "fail tag=3 errno=EIO count=1"),
    ("fail lba 2048..4095 op=read", "fail op=read lba=2048..4095"),
    ("drop op=write p=0.01", "drop op=write p=0.01"),
    ("drop", "drop"),
    ("corrupt op=read lba 100 byte=17", "corrupt op=read lba=100 byte=17"),
    ("torn sectors=8 errno=EIO", "torn sectors=8 errno=EIO"),
    ("hang tag 7", "hang tag=7"),
    ("flakey up=10s down=2s mode=drop", "flakey up=10s down=2s mode=drop"),
    ("fail q=1 size=4k..64k fua op=write,flush errno=28", "fail q=1 op=write,flush size=4096..65536 fua errno=ENOSPC"),
    ("delay 500us", "delay 500us"),
    ("corrupt", "corrupt"),
])
def test_parse_and_describe(line, text):
    (rule,) = grammar.parse(line)
    assert grammar.describe(rule) == text
    # the canonical text parses to the same rule, and survives the native struct
    assert grammar.parse(text) == [rule]
    r = ffi.new("struct us_fault_rule *")
    grammar.to_struct(rule, r)
    assert grammar.describe(grammar.from_struct(r)) == text


def test_badblocks_split_into_spans():
    rules = grammar.parse("badblocks 100 2048..2200")
    assert [r["lba"] for r in rules] == [(100, 100), (2048, 2111), (2112, 2175), (2176, 2200)]
    assert [grammar.describe(r) for r in rules][0] == "badblocks 100"


@pytest.mark.parametrize("line, col, words", [
    ("", 1, "empty rule"),
    ("frob", 1, "unknown action 'frob'"),
    ("delay", 6, "delay needs a duration"),
    ("delay 5xs", 7, "not a duration"),
    ("delay 2s..1s", 7, "ends before it starts"),
    ("delay 61s", 7, "longer than 60s"),
    ("fail op=wrte", 6, "unknown op 'wrte'"),
    ("fail lba 5..3", 6, "ends before it starts"),
    ("fail lba", 6, "lba needs a value"),
    ("fail errno=EFOO", 6, "unknown errno 'EFOO'"),
    ("fail 0", 6, "unexpected word '0'"),
    ("hang p=2", 6, "outside 0..1"),
    ("hang count=0", 6, "count=0"),
    ("corrupt errno=EIO", 9, "corrupt takes no errno="),
    ("drop op=read", 1, "not reads"),
    ("torn op=read", 1, "writes only"),
    ("corrupt op=flush", 1, "op=read or op=write"),
    ("flakey up=1s", 13, "needs up=DURATION and down=DURATION"),
    ("flakey up=1s down=10us", 14, "at least 1ms"),
    ("badblocks", 10, "badblocks needs sectors"),
    ("badblocks 1 p=0.5", 13, "badblocks takes no p="),
    ("fail tag=5000", 6, "below 4096"),
    ("fail frob=1", 6, "unknown word 'frob=1'"),
])
def test_bad_rules_name_the_column(line, col, words):
    with pytest.raises(grammar.RuleError) as e:
        grammar.parse(line)
    assert e.value.col == col and words in str(e.value)
    assert isinstance(e.value, UsageError) and "\n" not in str(e.value)


@pytest.fixture
def dev():
    s = shm_mod.create(11, nr_queues=2, depth=16, records=16, pid=os.getpid())
    yield s
    s.close()
    shm_mod.remove(11)


def ev(s, op, sector, sectors=8, q=0, tag=1, flags=0):
    code = lib.us_fault_eval(s.base, q, tag, op | flags, sector, sectors)
    return grammar.fault_label(code)


def test_matcher_fields(dev):
    table.add(11, "fail q=1 tag 2")
    table.add(11, "delay 1ms lba 100..107 op=read")
    table.add(11, "drop fua")
    assert ev(dev, READ, 0, q=1, tag=2) == "fail#1"
    assert ev(dev, READ, 0, q=0, tag=2) == "" and ev(dev, READ, 0, q=1, tag=3) == ""
    # LBA ranges match on overlap, inclusive at both ends
    assert ev(dev, READ, 92) == "" and ev(dev, READ, 93) == "delay#2" and ev(dev, READ, 107) == "delay#2"
    assert ev(dev, READ, 108) == "" and ev(dev, WRITE, 100) == ""
    assert ev(dev, WRITE, 0, flags=lib.UBLK_IO_F_FUA) == "drop#3" and ev(dev, WRITE, 0) == ""
    assert ev(dev, FLUSH, 0) == ""  # drop fua: a flush carries no FUA


def test_count_and_hits(dev):
    table.add(11, "fail op=write count=2")
    assert [ev(dev, WRITE, 0) for _ in range(4)] == ["fail#1", "fail#1", "", ""]
    (r,) = table.rules(11)["rules"]
    assert r["hits"] == 2 and r["left"] == 0


def test_probability_replays_with_the_seed(dev):
    table.add(11, "fail p=0.3")
    table.set_seed(11, 1234)
    first = [ev(dev, READ, i) for i in range(2000)]
    table.set_seed(11, 1234)
    again = [ev(dev, READ, i) for i in range(2000)]
    assert first == again
    hits = first.count("fail#1")
    assert 500 < hits < 700, hits  # 30% of 2000, within ~4.6 sigma
    table.set_seed(11, 99)
    assert [ev(dev, READ, i) for i in range(2000)] != first


def test_badblocks_heal_per_sector(dev):
    table.add(11, "badblocks 100..103")
    assert ev(dev, READ, 96) == "badblocks#1"
    assert ev(dev, WRITE, 100, sectors=2) == ""  # rewrites 100, 101
    assert ev(dev, READ, 100, sectors=2) == "" and ev(dev, READ, 102, sectors=1) == "badblocks#1"
    assert table.rules(11)["rules"][0]["healed"] == 2
    assert ev(dev, WRITE, 102, sectors=8) == "" and ev(dev, READ, 96) == ""


def test_first_match_wins_and_clear(dev):
    table.add(11, "delay 1ms op=read")
    table.add(11, "fail")
    assert ev(dev, READ, 0) == "delay#1" and ev(dev, WRITE, 0) == "fail#2"
    assert table.clear(11, 1) == 1
    assert ev(dev, READ, 0) == "fail#2"
    with pytest.raises(Exception, match="no fault rule #7"):
        table.clear(11, 7)
    assert table.clear(11) == 1 and ev(dev, WRITE, 0) == ""


def test_slots_all_or_nothing(dev):
    for i in range(250):
        table.add(11, f"fail lba {i}")
    with pytest.raises(Exception, match="do not fit, 6 of 256 slots free"):
        table.add(11, "badblocks 0..511")
    assert len(table.rules(11)["rules"]) == 250
