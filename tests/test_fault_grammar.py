"""The fault rule language and the native matcher, on the host (no device):
parse/describe round trips, one-line errors with the column, and which IO a
rule in real shared memory matches (us_fault_eval runs the queue threads' code)."""
import os

import pytest

from ublkshell._native import ffi, lib
from ublkshell.devices import paths
from ublkshell.observe import shm as shm_mod
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
    # every field at its bound survives the C struct (cffi raises on what a field cannot hold)
    ("fail q=4095 tag=4095 lba=9223372036854775807 count=9223372036854775807 errno=4095",
     "fail q=4095 tag=4095 lba=9223372036854775807 errno=4095 count=9223372036854775807"),
    ("fail lba=0..0x7fffffffffffffff", "fail lba=0..9223372036854775807"),
    ("torn sectors=4294967295", "torn sectors=4294967295"),
    ("corrupt byte=4095 size=7E", "corrupt size=8070450532247928832 byte=4095"),
    ("flakey up=24h down=1ms", "flakey up=24h down=1ms mode=error"),
    ("delay 1001ns..60s", "delay 1001ns..1m"),
    ("delay 1.5ms", "delay 1500us"),
    ("fail p=1e-05", "fail p=1e-05"),
    ("fail lba 010", "fail lba=10"),
    ("hang op=read,read", "hang op=read"),
])
def test_parse_and_describe(line, text):
    (rule,) = grammar.parse(line)
    assert grammar.describe(rule) == text
    # the canonical text parses to the same rule, and survives the native struct
    assert grammar.parse(text) == [rule]
    r = ffi.new("struct us_fault_rule *")
    grammar.to_struct(rule, r)
    assert grammar.describe(grammar.from_struct(r)) == text


def test_badblocks_one_rule_per_range_of_any_length():
    rules = grammar.parse("badblocks 100 2048..2200 0..0x10000000000 0..9223372036854775807")
    assert [r["lba"] for r in rules] == [(100, 100), (2048, 2200), (0, 1 << 40), (0, (1 << 63) - 1)]
    assert [grammar.describe(r) for r in rules] == [
        "badblocks 100", "badblocks 2048..2200", "badblocks 0..1099511627776",
        "badblocks 0..9223372036854775807"]
    for r in rules:
        assert grammar.parse(grammar.describe(r)) == [r]


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
    ("fail tag=5000", 6, "tag '5000' is out of range 0..4095"),
    ("fail frob=1", 6, "unknown word 'frob=1'"),
])
def test_bad_rules_name_the_column(line, col, words):
    with pytest.raises(grammar.RuleError) as e:
        grammar.parse(line)
    assert e.value.col == col and words in str(e.value)
    assert isinstance(e.value, UsageError) and "\n" not in str(e.value)


HUGE = "9" * 5000


def test_probability_reads_back_exactly():
    (rule,) = grammar.parse("fail p=0.123456789")
    assert grammar.describe(rule) == "fail p=0.123456789" and grammar.parse(grammar.describe(rule)) == [rule]


@pytest.mark.parametrize("line, col, words", [
    # numbers a field cannot hold: a one-line error, never OverflowError or a cffi error
    ("fail lba=99999999999999999999999", 6, "not a whole number"),
    ("fail lba=18446744073709551615", 6, "out of range 0..2^63-1"),
    ("fail lba=9223372036854775808", 6, "out of range 0..2^63-1"),
    ("fail lba=0x8000000000000000", 6, "out of range 0..2^63-1"),
    ("fail lba=0x10000000000000000", 6, "not a whole number"),
    ("fail lba=" + HUGE, 6, "(5000 characters)"),
    ("fail lba 1.." + HUGE, 6, "(5000 characters)"),
    ("fail lba=-1", 6, "'-1' is not a whole number"),
    ("fail lba=+1", 6, "not a whole number"),
    ("fail lba=\u0661\u0662", 6, "not a whole number"),
    ("fail lba=0x", 6, "'0x' is not a whole number"),
    ("fail lba=1_000", 6, "'1_000' is not a whole number"),
    ("fail lba=1e3", 6, "not a whole number"),
    ("fail lba=", 6, "'' is not a whole number"),
    ("fail lba=5..", 6, "nothing after '..'"),
    ("fail lba=..5", 6, "'' is not a whole number"),
    ("fail lba=1..2..3", 6, "'2..3' is not a whole number"),
    ("fail q=4096", 6, "q '4096' is out of range 0..4095"),
    ("fail q=-1", 6, "not a whole number"),
    ("fail q=", 6, "not a whole number"),
    ("fail tag=4096", 6, "out of range 0..4095"),
    ("fail tag " + HUGE, 6, "not a whole number"),
    ("fail count=9223372036854775808", 6, "out of range 1..2^63-1"),
    ("fail count=" + HUGE, 6, "not a whole number"),
    ("fail count=-5", 6, "not a whole number"),
    ("fail errno=4096", 6, "errno 4096 is out of range 1..4095"),
    ("fail errno=0", 6, "errno 0 is out of range"),
    ("fail errno=99999", 6, "unknown errno '99999'"),
    ("fail errno=\u0661\u0662", 6, "unknown errno"),
    ("fail errno=", 6, "unknown errno ''"),
    ("fail errno=errorcode", 6, "unknown errno 'errorcode'"),
    ("fail errno=-5", 6, "unknown errno"),
    ("corrupt byte=4096", 9, "byte '4096' is out of range 0..4095"),
    ("corrupt byte=-1", 9, "not a whole number"),
    ("torn sectors=4294967296", 6, "out of range 1..2^32-1"),
    ("fail p=nan", 6, "p must be a number in 0..1, not 'nan'"),
    ("fail p=inf", 6, "not 'inf'"),
    ("fail p=-inf", 6, "not '-inf'"),
    ("fail p=1e400", 6, "outside 0..1"),
    ("fail p=1.0000001", 6, "outside 0..1"),
    ("fail p=-0.5", 6, "not '-0.5'"),
    ("fail p=", 6, "not ''"),
    ("fail p=\u0660.\u0665", 6, "p must be a number"),
    ("fail p=0x1", 6, "p must be a number"),
    ("fail p=" + HUGE, 6, "p must be a number"),
    ("fail size=1.5e400k", 6, "not a size"),
    ("fail size=99999999999999999999999999", 6, "not a size"),
    ("fail size=9E", 6, "out of range"),
    ("fail size=\u0661k", 6, "not a size"),
    ("fail size=4k..", 6, "nothing after '..'"),
    ("fail size=", 6, "not a size"),
    ("fail size=0", 6, "greater than zero"),
    ("delay 5ms..", 7, "nothing after '..'"),
    ("delay ..5ms", 7, "not a duration"),
    ("delay \u0661ms", 7, "not a duration"),
    ("delay 1.5e400s", 7, "not a duration"),
    ("delay 99999999999999999999999h", 7, "out of range"),
    ("delay " + HUGE + "s", 7, "not a duration"),
    ("delay 5", 7, "not a duration"),
    ("delay nan", 7, "not a duration"),
    ("flakey up=25h down=1s", 8, "out of range"),
    ("flakey up=1s down=0ms", 14, "at least 1ms"),
    ("flakey up= down=1s", 8, "not a duration"),
    ("flakey up=1s down=1s mode=", 22, "mode is error or drop, not ''"),
    ("badblocks 9223372036854775808", 11, "sector '9223372036854775808' is out of range"),
    ("badblocks " + HUGE, 11, "(5000 characters)"),
    ("badblocks 5..", 11, "nothing after '..'"),
    ("badblocks 7..5", 11, "ends before it starts"),
    ("badblocks -1", 11, "not a whole number"),
    ("fail fua=0", 6, "fua takes no value"),
    ("fail op=", 6, "unknown op ''"),
    ("fail op=read,", 6, "unknown op ''"),
    ("fail mode=drop", 6, "fail takes no mode="),
])
def test_hostile_numbers_are_rule_errors(line, col, words):
    with pytest.raises(grammar.RuleError) as e:
        grammar.parse(line)
    msg = str(e.value)
    assert e.value.col == col and words in msg, msg
    # one short line, whatever the input's length
    assert "\n" not in msg and len(msg) < 200, msg


def test_badblocks_ranges_are_bounded_before_any_rule_is_made():
    line = "badblocks " + " ".join(str(i) for i in range(257))
    with pytest.raises(grammar.RuleError) as e:
        grammar.parse(line)
    assert e.value.col == line.rindex(" ") + 2 and "at most 256 ranges" in str(e.value)


def test_flags_match_the_native_header():
    assert (grammar.FM_FUA, grammar.FM_LBA) == (lib.US_FM_FUA, lib.US_FM_LBA)


@pytest.fixture
def dev(tmp_path, monkeypatch):
    # a private directory: a real device (or another run of this suite) may be number 11
    monkeypatch.setenv("UBLKSHELL_DATA_DIR", str(tmp_path))
    s = shm_mod.create(11, nr_queues=2, depth=16, records=16, pid=os.getpid())
    yield s
    s.close()
    paths.forget(11)


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


def test_flush_never_matches_a_rule_with_a_range(dev):
    """A FLUSH comes as sector 0, length 0: an LBA range that starts at 0 must not take it."""
    table.add(11, "fail lba 0..7")
    assert ev(dev, FLUSH, 0, sectors=0) == ""
    assert ev(dev, READ, 0, sectors=1) == "fail#1" and ev(dev, WRITE, 7, sectors=1) == "fail#1"
    table.add(11, "fail lba=0..9223372036854775807 op=read,write,flush")
    assert ev(dev, FLUSH, 0, sectors=0) == ""
    table.add(11, "delay 1ms op=flush")
    assert ev(dev, FLUSH, 0, sectors=0) == "delay#3"
    assert table.clear(11) == 3
    # no range at all: every IO, flushes too
    table.add(11, "fail")
    assert ev(dev, FLUSH, 0, sectors=0) == "fail#4"
    # the flag, not the numbers, comes back from shared memory
    assert [r["lba"] for r in table.rules(11)["rules"]] == [None]
    table.add(11, "fail lba=0..9223372036854775807")
    assert table.rules(11)["rules"][1]["lba"] == (0, (1 << 63) - 1)


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
    with pytest.raises(Exception, match="7 rule\\(s\\) do not fit, 6 of 256 slots free"):
        table.add(11, "badblocks 0 10..20 30 40 50 60..1000000000000 70")
    assert len(table.rules(11)["rules"]) == 250
    # a range of any length is one rule
    assert len(table.add(11, "badblocks 0..1000000000000 5 7 9 11 13")) == 6
    assert len(table.rules(11)["rules"]) == 256


@pytest.mark.parametrize("line, text", [
    ("fail op=write,flush op=read", "fail op=read,write,flush"),
    ("fail op=read,read", "fail op=read"),
    ("delay 1ms op=flush,write", "delay 1ms op=write,flush"),
])
def test_ops_have_one_spelling_whatever_the_order_typed(line, text):
    # found by the Hypothesis grammar test: the C mask reads back in code order
    (rule,) = grammar.parse(line)
    assert grammar.describe(rule) == text
    r = ffi.new("struct us_fault_rule *")
    grammar.to_struct(rule, r)
    assert grammar.from_struct(r)["ops"] == rule["ops"]
