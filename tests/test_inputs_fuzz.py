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
from ublkshell.verbs import VERBS, call

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
        elif conv is validate.dev_id_in_range:
            assert isinstance(value, int) and 0 <= value < 2 << 20
        elif value is not None and not isinstance(value, (str, int, float, bool, list, tuple)):
            raise AssertionError((verb, name, value))


@FAST
@given(st.sampled_from(sorted(VERBS)), st.dictionaries(st.sampled_from(
    ["id", "ids", "all", "words", "rule", "seed", "keep", "partial", "target", "size", "depth", "queues",
     "dev_id", "file", "json", "op", "queues", "recovery", "max_io", "block_size", "frob"]), values, max_size=6))
def test_every_verb_checks_any_arguments(verb, args):
    schema = VERBS[verb].args
    try:
        out = validate.check(verb, schema, args)
    except UsageError as e:
        _one_line(e)
        return
    _check_types(verb, schema, out)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(["stats", "lat", "inflight", "faults", "clear", "seed", "kill", "recover", "powercut",
                        "fail", "delay", "badblocks"]),
       st.dictionaries(st.sampled_from(["id", "words", "rule", "seed", "op", "keep", "partial"]), values,
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
