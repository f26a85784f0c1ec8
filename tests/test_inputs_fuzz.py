"""Property-based tests of everything that parses what people (or programs) send:
the socket's request decoder, the argument checks every verb goes through,
sizes and durations. Whatever the input, the answer is a value of the right
type and range, or a one-line UsageError/ProtocolError: never another
exception. A few thousand examples each; scripts/fuzz.sh runs the same
against a live server for much longer."""
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from ublkshell import units, validate
from ublkshell.bridge.protocol import MAX_DEPTH, ProtocolError, decode_request
from ublkshell.errors import UblkError, UsageError
from ublkshell.verbs import RECORD_ARGS, TOP_ARGS, TRACE_ARGS, VERBS, call

FAST = settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# JSON values as a hostile client would send them: deep, huge, odd numbers, odd strings
scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-2**70, max_value=2**70)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40)
           | st.sampled_from(["0", "-1", "1e400", "fuse0", "fuse", "١٢", "0x10", "1_000", " 7 ", "\x00",
                              "1G", "99999999999999T", "5ms", "nan", "inf", "", "..", "-", "a" * 5000]))
values = scalars | st.lists(scalars, max_size=4) | st.dictionaries(st.text(max_size=6), scalars, max_size=3)


def _one_line(e: Exception) -> None:
    text = str(e)
    assert text and "\n" not in text and "Traceback" not in text, text


@FAST
@given(st.binary(max_size=300))
def test_decoder_takes_any_bytes(data):
    try:
        rid, cmd, args = decode_request(data)
    except ProtocolError as e:
        _one_line(e)
        return
    assert isinstance(cmd, str) and cmd and isinstance(args, dict)
    assert rid is None or isinstance(rid, (int, str)) and not isinstance(rid, bool)


@FAST
@given(st.dictionaries(st.sampled_from(["id", "cmd", "args", "x"]), values, max_size=4))
def test_decoder_takes_any_json_object(msg):
    try:
        decode_request(json.dumps(msg).encode())
    except ProtocolError as e:
        _one_line(e)


@FAST
@given(st.integers(min_value=0, max_value=20000), st.sampled_from(["[", "{\"a\":"]))
def test_decoder_refuses_deep_nesting_without_recursing(depth, opener):
    line = (opener * depth).encode()
    if depth > MAX_DEPTH:
        with pytest.raises(ProtocolError, match="nests deeper"):
            decode_request(line)
    else:
        with pytest.raises(ProtocolError):
            decode_request(line)  # unterminated: not JSON, but a clean error


def _check_types(verb: str, schema: dict, out: dict) -> None:
    assert set(out) == set(schema)
    for name, value in out.items():
        conv = schema[name].conv
        if conv is validate.flag:
            assert isinstance(value, bool)
        elif conv is validate.dev_id:
            assert isinstance(value, int) and 0 <= value < 2 << 20
        elif value is not None and not isinstance(value, (str, int, float, bool, list, tuple)):
            raise AssertionError((verb, name, value))


# every verb's schema, and those the CLI checks itself (trace, record)
SCHEMAS = {**{v: VERBS[v].args for v in VERBS}, "trace": TRACE_ARGS, "record": RECORD_ARGS, "top": TOP_ARGS}


@FAST
@given(st.sampled_from(sorted(SCHEMAS)), st.dictionaries(st.sampled_from(
    ["id", "ids", "all", "words", "rule", "seed", "keep", "partial", "target", "size", "depth", "queues",
     "dev_id", "file", "json", "op", "queues", "recovery", "max_io", "block_size", "frob", "filters",
     "from_start", "count", "duration", "format", "output", "force", "timeout", "histograms", "interval",
     "batch"]), values, max_size=6))
def test_every_verb_checks_any_arguments(verb, args):
    schema = SCHEMAS[verb]
    try:
        out = validate.check(verb, schema, args)
    except UsageError as e:
        _one_line(e)
        return
    _check_types(verb, schema, out)
    if verb in ("trace", "record"):
        assert out["count"] >= 0 and out["duration"] >= 0 and "\0" not in (out.get("output") or "")


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(["stats", "lat", "inflight", "faults", "clear", "seed", "kill", "recover", "powercut",
                        "fail", "delay", "badblocks", "info", "resize", "quiesce", "resume", "upgrade"]),
       st.dictionaries(st.sampled_from(["id", "words", "rule", "seed", "op", "keep", "partial", "size", "force",
                                        "timeout", "histograms"]), values,
                       max_size=4))
def test_verbs_answer_any_arguments_in_one_line(tmp_path_factory, verb, args):
    # no devices exist here: each call ends in a checked refusal, never a crash
    d = tmp_path_factory.getbasetemp()
    os.environ["UBLKSHELL_STATE_DIR"] = str(d / "state")
    os.environ["UBLKSHELL_DATA_DIR"] = str(d / "data")
    try:
        call(verb, args)
    except UblkError as e:
        _one_line(e)
    finally:
        del os.environ["UBLKSHELL_STATE_DIR"], os.environ["UBLKSHELL_DATA_DIR"]


@FAST
@given(st.text(max_size=30) | st.from_regex(r"\d{1,30}(\.\d{1,30})?[kKmMgGtTpPeE]?(i?[bB])?", fullmatch=True))
def test_sizes(text):
    try:
        n = units.parse_size(text, "--size")
    except UsageError as e:
        _one_line(e)
        assert e.args[0].startswith("--size: ")
        return
    assert isinstance(n, int) and 1 <= n <= units.MAX_SIZE


@FAST
@given(st.integers(min_value=1, max_value=units.MAX_SIZE))
def test_every_size_reads_back(n):
    assert units.parse_size(str(n), "x") == n
    for unit, mult in (("k", 1 << 10), ("M", 1 << 20), ("G", 1 << 30)):
        if n % mult == 0:
            assert units.parse_size(f"{n // mult}{unit}", "x") == n


@FAST
@given(st.text(max_size=30) | st.from_regex(r"\d{1,30}(\.\d{1,30})?(ns|us|ms|s|m|h)?", fullmatch=True))
def test_durations(text):
    try:
        ns = units.parse_duration(text, "--duration")
    except UsageError as e:
        _one_line(e)
        return
    assert isinstance(ns, int) and 0 <= ns <= units.MAX_DURATION_NS
    assert units.parse_duration(units.fmt_duration(ns), "x") == ns


# -- the fault rule grammar ------------------------------------------------------
RULE_WORDS = st.sampled_from(
    ["q=0", "q=4095", "q=4096", "tag", "tag=3", "tag 7", "op=read", "op=write,flush", "op=", "op=read,read",
     "lba", "lba=0", "lba=0..7", "lba 100..200", "lba=5..3", "lba=0..9223372036854775807", "lba=..7",
     "size=4k..64k", "size=0", "size=1.5e400k", "fua", "fua=1", "p=0.5", "p=nan", "p=1e-400", "p=2",
     "count=1", "count=0", "count=9223372036854775807", "count=9223372036854775808", "errno=EIO",
     "errno=4095", "errno=0", "errno=EFOO", "byte=17", "byte=4096", "sectors=8", "sectors=0",
     "sectors=4294967296", "up=1ms", "up=999us", "down=24h", "down=25h", "mode=drop", "mode=x",
     "5ms", "1ms..50ms", "61s", "0s", "100", "2048..2055", "0..1099511627775", "7..", "..", "=", "a=b",
     "١٢", "0x10", "1_000", "9" * 30])
NUMBERS = st.integers(min_value=-2**70, max_value=2**70).map(str)


@st.composite
def rule_lines(draw):
    action = draw(st.sampled_from(["delay", "fail", "drop", "corrupt", "torn", "hang", "flakey", "badblocks",
                                   "frob", ""]))
    keyed = st.tuples(st.sampled_from(["q=", "tag=", "lba=", "count=", "byte=", "sectors=", "errno=", ""]),
                      NUMBERS).map("".join)
    words = draw(st.lists(RULE_WORDS | keyed, max_size=8))
    return " ".join([action, *words])


@pytest.fixture(scope="module")
def rule_shm(tmp_path_factory):
    from ublkshell.observe import shm as shm_mod

    d = tmp_path_factory.mktemp("rules")
    os.environ["UBLKSHELL_DATA_DIR"] = str(d / "data")
    try:
        s = shm_mod.create(21, nr_queues=1, depth=8, records=16, pid=os.getpid())
        yield s
    finally:
        del os.environ["UBLKSHELL_DATA_DIR"]
    s.close()


def _grammar_property(line: str, s) -> None:
    from ublkshell._native import ffi, lib
    from ublkshell.faults import grammar

    try:
        rules = grammar.parse(line)
    except grammar.RuleError as e:
        _one_line(e)
        assert 1 <= e.col <= len(line) + 1, (line, e.col)
        return
    assert rules
    for rule in rules:
        r = ffi.new("struct us_fault_rule *")
        grammar.to_struct(rule, r)  # every value fits its C field
        text = grammar.describe(rule)
        assert grammar.parse(text) == [rule], (line, text)
        assert grammar.describe(grammar.from_struct(r)) == text
    # what Python accepts, the C side accepts too, as one set
    n = len(rules)
    arr = ffi.new("struct us_fault_rule[]", n)
    for i, rule in enumerate(rules):
        grammar.to_struct(rule, arr[i])
    ids = ffi.new("uint32_t[]", n)
    lib.us_fault_del(s.base, 0)
    assert lib.us_fault_add_set(s.base, arr, n, ids) == n, line
    lib.us_fault_del(s.base, 0)


@FAST
@given(rule_lines())
def test_rule_lines_parse_to_rules_that_fit_and_round_trip(rule_shm, line):
    _grammar_property(line, rule_shm)


@FAST
@given(st.text(max_size=60))
def test_any_text_is_a_rule_or_a_column_error(rule_shm, line):
    _grammar_property(line, rule_shm)
