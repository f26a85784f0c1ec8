"""Every face reads durations and sizes with the one parser each (units.py): the same
words mean the same everywhere, minutes included, and a bad one is one line naming
where it was typed."""
import pytest

from ublkshell import commands
from ublkshell.errors import UsageError
from ublkshell.faults import grammar
from ublkshell.observe.trace import Filter
from ublkshell.validate import check, duration
from ublkshell.verbs import TRACE_ARGS

MINUTE = 60 * 10**9


@pytest.mark.parametrize("text, ns", [("1m", MINUTE), ("1.5s", 1_500_000_000), ("250us", 250_000),
                                      ("7ns", 7), ("2ms", 2_000_000)])
def test_a_duration_means_the_same_in_trace_filters_rules_and_options(text, ns):
    assert Filter.parse([f"min_lat={text}"]).min_lat_ns == ns
    assert grammar.parse(f"delay {text}")[0]["delay"] == (ns, ns)
    assert check("trace", TRACE_ARGS, {"id": 0, "duration": text})["duration"] == ns
    if ns >= 10**6:
        assert grammar.parse(f"flakey up={text} down={text}")[0]["up"] == ns


def test_trace_and_delay_both_take_minutes():
    # the example: one face took `m`, the other did not
    assert Filter.parse(["min_lat=1m"]).min_lat_ns == MINUTE
    assert grammar.parse("delay 1m")[0]["delay"] == (MINUTE, MINUTE)


def test_bare_numbers_are_seconds_only_where_the_option_says_so():
    assert check("trace", TRACE_ARGS, {"id": 0, "duration": "2"})["duration"] == 2 * 10**9
    assert check("trace", TRACE_ARGS, {"id": 0, "duration": 1.5})["duration"] == 1_500_000_000
    assert check("trace", TRACE_ARGS, {"id": 0, "duration": ""})["duration"] == 0
    with pytest.raises(UsageError, match="trace filter min_lat: '5' is not a duration"):
        Filter.parse(["min_lat=5"])


def test_top_interval_is_a_duration_too():
    p = commands.shell_parser()
    interval = p.parse_args(["top", "--interval", "500ms"]).interval
    assert duration("s", lo=10**7)(interval, "top: --interval") == 500_000_000
    assert duration("s", lo=10**7)(p.parse_args(["top"]).interval, "x") == 10**9
    with pytest.raises(UsageError, match=r"^top: --interval: 0 is out of range \(10ms\.\.24h\)$"):
        duration("s", lo=10**7)("0", "top: --interval")


@pytest.mark.parametrize("bad", ["5x", "1e3s", "-1s", "1.5.2s", "५s"])
def test_a_bad_duration_is_one_line_naming_where_it_was_typed(bad):
    for call, where in ((lambda: check("trace", TRACE_ARGS, {"id": 0, "duration": bad}), "--duration"),
                        (lambda: Filter.parse([f"min_lat={bad}"]), "trace filter min_lat"),
                        (lambda: grammar.parse(f"delay {bad}"), "delay")):
        with pytest.raises(UsageError) as e:
            call()
        assert where in str(e.value) and "\n" not in str(e.value)


def test_sizes_in_rules_use_the_size_parser():
    assert grammar.parse("fail size=4k..1M")[0]["size"] == (4096, 1 << 20)
    assert grammar.parse("fail size=1.5k")[0]["size"] == (1536, 1536)
    with pytest.raises(UsageError, match="not a size"):
        grammar.parse("fail size=4q")
