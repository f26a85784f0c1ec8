"""The fault rule language: one line per rule, the same in the shell, on the
command line and in the stats tree's `faults` file (docs/faults.md).

    ACTION [VALUE...] [WORD...]

ACTION is delay, fail, drop, corrupt, torn, hang, flakey or badblocks. The
words narrow which IOs match (q=, tag, op=, lba, size=, fua), how often
(p=, count=) and what the action does (errno=, byte=, sectors=, up=, down=,
mode=). LBAs are 512-byte sectors, as in `trace`; ranges A..B include both
ends. A bad line raises RuleError naming the column of the offending word.
"""
import errno as _errno
import re

from ..errors import UsageError
from ..units import parse_size

ACTIONS = {
    "delay": "add latency: `delay 5ms` or uniform `delay 1ms..50ms`",
    "fail": "complete with an error instead of doing the IO (errno=EIO by default)",
    "drop": "acknowledge writes (and flush, discard, write-zeroes) without doing them",
    "corrupt": "flip one byte of the data: reads on the way up, writes on the way down",
    "torn": "store only the first sectors=N of a write (default half) but report success",
    "hang": "never complete the IO until the rule is cleared",
    "flakey": "dm-flakey: up=DUR down=DUR, while down mode=error fails IO, mode=drop drops writes",
    "badblocks": "dm-dust: reads of the listed sectors fail until they are written again",
}
OPS = {"read": 0, "write": 1, "flush": 2, "discard": 3, "write_zeroes": 5}
OP_NAMES = {v: k for k, v in OPS.items()}
WRITE_LIKE = ("write", "flush", "discard", "write_zeroes")
BAD_OPS = ("read", "write", "write_zeroes")  # reads fail, writes heal
MAX_DELAY_NS = 60 * 10**9
ALWAYS = 1 << 32
U64 = (1 << 64) - 1
BAD_SPAN = 64
# which words each action takes besides the IO match words
MATCH_WORDS = ("q", "tag", "op", "lba", "size", "fua", "p", "count")
ACTION_WORDS = {
    "delay": (),
    "fail": ("errno",),
    "drop": (),
    "corrupt": ("byte",),
    "torn": ("sectors", "errno"),
    "hang": (),
    "flakey": ("up", "down", "mode", "errno"),
    "badblocks": ("errno", "q"),
}
_UNITS = {"ns": 1, "us": 10**3, "ms": 10**6, "s": 10**9, "m": 60 * 10**9}


class RuleError(UsageError):
    def __init__(self, col: int, msg: str):
        super().__init__(f"column {col}: {msg}")
        self.col = col
        self.reason = msg


def _duration(text: str) -> int:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ns|us|ms|s|m)", text)
    if not m:
        raise ValueError(f"{text!r} is not a duration (e.g. 500us, 5ms, 2s)")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def _fmt_duration(ns: int) -> str:
    for unit, scale in (("s", 10**9), ("ms", 10**6), ("us", 10**3)):
        if ns >= scale and ns % scale == 0:
            return f"{ns // scale}{unit}"
    return f"{ns}ns" if ns < 1000 else f"{ns / 1e6:g}ms"


def _uint(text: str, what: str) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        raise ValueError(f"{what} must be a whole number, not {text!r}") from None
    if v < 0:
        raise ValueError(f"{what} must not be negative")
    return v


def _range(text: str, parse, what: str) -> tuple[int, int]:
    lo, sep, hi = text.partition("..")
    a = parse(lo, what)
    b = parse(hi, what) if sep else a
    if b < a:
        raise ValueError(f"{what} range {text!r} ends before it starts")
    return a, b


def _size(text: str, what: str) -> int:
    try:
        return parse_size(text, what)
    except UsageError as e:
        raise ValueError(f"{what}: {e}") from None


def _errno_value(text: str) -> int:
    if text.isdigit():
        v = int(text)
        if not 1 <= v <= 4095:
            raise ValueError(f"errno {v} is out of range 1..4095")
        return v
    v = getattr(_errno, text.upper(), None)
    if not isinstance(v, int) or text.upper() not in _errno.errorcode.values():
        raise ValueError(f"unknown errno {text!r} (e.g. EIO, ENOSPC, ETIMEDOUT, ENODATA, or a number)")
    return v


def _words(line: str):
    return [(m.start() + 1, m.group()) for m in re.finditer(r"\S+", line)]


def parse(line: str) -> list[dict]:
    """One rule line -> the rules it makes (badblocks may make several)."""
    words = _words(line)
    if not words:
        raise RuleError(1, "empty rule: give an action (" + ", ".join(ACTIONS) + ")")
    col, action = words[0]
    if action not in ACTIONS:
        raise RuleError(col, f"unknown action {action!r} (" + ", ".join(ACTIONS) + ")")
    rule = {"action": action, "q": -1, "tag": -1, "ops": [], "lba": None, "size": None,
            "fua": False, "p": None, "count": -1, "errno": 0, "byte": -1, "sectors": 0,
            "delay": None, "up": None, "down": None, "mode": "error"}
    bad: list[tuple[int, int]] = []
    allowed = set(ACTION_WORDS[action]) | (set() if action == "badblocks" else set(MATCH_WORDS))
    i = 1
    while i < len(words):
        col, w = words[i]
        key, eq, val = w.partition("=")
        # `tag 3` and `lba 100..200` read like the examples; `tag=3` works too
        if not eq and w in ("tag", "lba"):
            if i + 1 >= len(words):
                raise RuleError(col, f"{w} needs a value ({w} N or {w} A..B)")
            i += 1
            key, val, eq = w, words[i][1], "="
        try:
            if not eq and w == "fua":
                key = "fua"
            elif not eq:
                if action == "delay" and rule["delay"] is None:
                    lo, _, hi = w.partition("..")
                    a = _duration(lo)
                    b = _duration(hi) if hi else a
                    if b < a:
                        raise ValueError(f"delay range {w!r} ends before it starts")
                    if b > MAX_DELAY_NS:
                        raise ValueError("a delay longer than 60s would stall `del` for as long")
                    rule["delay"] = (a, b)
                    i += 1
                    continue
                if action == "badblocks":
                    bad.append(_range(w, _uint, "sector"))
                    i += 1
                    continue
                raise ValueError(f"unexpected word {w!r}")
            if key not in allowed:
                if key in MATCH_WORDS or any(key in v for v in ACTION_WORDS.values()):
                    raise ValueError(f"{action} takes no {key}=")
                raise ValueError(f"unknown word {w!r}")
            if key == "q":
                rule["q"] = _uint(val, "q")
            elif key == "tag":
                rule["tag"] = _uint(val, "tag")
                if rule["tag"] >= 4096:
                    raise ValueError("tag must be below 4096 (the largest queue depth)")
            elif key == "op":
                for o in val.split(","):
                    if o not in OPS:
                        raise ValueError(f"unknown op {o!r} (" + ", ".join(OPS) + ")")
                    rule["ops"].append(o)
            elif key == "lba":
                rule["lba"] = _range(val, _uint, "lba")
            elif key == "size":
                rule["size"] = _range(val, _size, "size")
            elif key == "fua":
                rule["fua"] = True
            elif key == "p":
                try:
                    p = float(val)
                except ValueError:
                    raise ValueError(f"p must be a number in 0..1, not {val!r}") from None
                if not 0 <= p <= 1:
                    raise ValueError(f"p={val} is outside 0..1")
                rule["p"] = p
            elif key == "count":
                rule["count"] = _uint(val, "count")
                if rule["count"] == 0:
                    raise ValueError("count=0 would never apply; clear the rule instead")
            elif key == "errno":
                rule["errno"] = _errno_value(val)
            elif key == "byte":
                rule["byte"] = _uint(val, "byte")
                if rule["byte"] >= 4096:
                    raise ValueError("byte is an offset into a sector (of up to 4096 bytes)")
            elif key == "sectors":
                rule["sectors"] = _uint(val, "sectors")
                if not rule["sectors"]:
                    raise ValueError("sectors=0 keeps nothing: use drop")
            elif key in ("up", "down"):
                rule[key] = _duration(val)
                if rule[key] < 10**6:
                    raise ValueError(f"{key}= must be at least 1ms")
            elif key == "mode":
                if val not in ("error", "drop"):
                    raise ValueError(f"mode is error or drop, not {val!r}")
                rule["mode"] = val
        except ValueError as e:
            raise RuleError(col, str(e)) from None
        i += 1

    end = len(line) + 1
    if action == "delay" and rule["delay"] is None:
        raise RuleError(end, "delay needs a duration: delay 5ms, or delay 1ms..50ms")
    if action == "flakey" and (rule["up"] is None or rule["down"] is None):
        raise RuleError(end, "flakey needs up=DURATION and down=DURATION (e.g. up=10s down=2s)")
    if action == "badblocks" and not bad:
        raise RuleError(end, "badblocks needs sectors: badblocks 100 2048..2055")
    if action == "drop" and "read" in rule["ops"]:
        raise RuleError(1, "drop applies to writes, flush, discard and write_zeroes, not reads")
    if action == "torn" and set(rule["ops"]) - {"write"}:
        raise RuleError(1, "torn applies to writes only")
    if action == "badblocks":
        out = []
        for lo, hi in bad:
            # one rule per 64 sectors: each keeps one bit per sector for rewrites
            for start in range(lo, hi + 1, BAD_SPAN):
                out.append(dict(rule, lba=(start, min(hi, start + BAD_SPAN - 1)), ops=list(BAD_OPS)))
        return out
    if action == "drop" and not rule["ops"]:
        rule["ops"] = list(WRITE_LIKE)
    if action == "corrupt":
        if set(rule["ops"]) - {"read", "write"}:
            raise RuleError(1, "corrupt changes data: op=read or op=write")
        # a flush or discard has no data to flip: it must not count as a hit
        rule["ops"] = rule["ops"] or ["read", "write"]
    if action == "torn":
        rule["ops"] = ["write"]
    return [rule]


def describe(rule: dict) -> str:
    """The canonical line for a rule (parse(describe(r)) gives r back)."""
    a = rule["action"]
    words = [a]
    if a == "delay":
        lo, hi = rule["delay"]
        words.append(_fmt_duration(lo) + (f"..{_fmt_duration(hi)}" if hi != lo else ""))
    if a == "badblocks":
        lo, hi = rule["lba"]
        words.append(f"{lo}..{hi}" if hi != lo else str(lo))
    if rule["q"] >= 0:
        words.append(f"q={rule['q']}")
    if rule["tag"] >= 0:
        words.append(f"tag={rule['tag']}")
    default_ops = {"drop": list(WRITE_LIKE), "torn": ["write"], "badblocks": list(BAD_OPS),
                   "corrupt": ["read", "write"]}
    if rule["ops"] and rule["ops"] != default_ops.get(a):
        words.append("op=" + ",".join(rule["ops"]))
    if rule["lba"] is not None and a != "badblocks":
        lo, hi = rule["lba"]
        words.append(f"lba={lo}..{hi}" if hi != lo else f"lba={lo}")
    if rule["size"] is not None:
        lo, hi = rule["size"]
        words.append(f"size={lo}..{hi}" if hi != lo else f"size={lo}")
    if rule["fua"]:
        words.append("fua")
    if a == "flakey":
        words += [f"up={_fmt_duration(rule['up'])}", f"down={_fmt_duration(rule['down'])}",
                  f"mode={rule['mode']}"]
    if rule["byte"] >= 0:
        words.append(f"byte={rule['byte']}")
    if rule["sectors"]:
        words.append(f"sectors={rule['sectors']}")
    if rule["errno"]:
        words.append(f"errno={_errno.errorcode.get(rule['errno'], rule['errno'])}")
    if rule["p"] is not None:
        words.append(f"p={rule['p']:g}")
    if rule["count"] >= 0:
        words.append(f"count={rule['count']}")
    return " ".join(words)


# -- to and from the shared-memory struct (native/faults.h) -------------------
_ACTION_CODES = {"delay": 1, "fail": 2, "drop": 3, "corrupt": 4, "torn": 5, "hang": 6,
                 "flakey": 7, "badblocks": 8}
ACTION_OF_CODE = {v: k for k, v in _ACTION_CODES.items()}


def to_struct(rule: dict, r) -> None:
    """Fill a cffi `struct us_fault_rule *`."""
    r.action = _ACTION_CODES[rule["action"]]
    r.q = rule["q"]
    r.tag = rule["tag"]
    r.op_mask = sum(1 << OPS[o] for o in set(rule["ops"]))
    r.flags = 1 if rule["fua"] else 0
    r.lba_lo, r.lba_hi = rule["lba"] if rule["lba"] is not None else (0, U64)
    r.size_lo, r.size_hi = rule["size"] if rule["size"] is not None else (0, U64)
    r.prob = ALWAYS if rule["p"] is None else min(ALWAYS, int(round(rule["p"] * ALWAYS)))
    r.count = rule["count"]
    r.err = rule["errno"]
    r.byte = rule["byte"]
    if rule["action"] == "delay":
        r.t_lo_ns, r.t_hi_ns = rule["delay"]
    elif rule["action"] == "flakey":
        r.t_lo_ns, r.t_hi_ns = rule["up"], rule["down"]
        r.arg = 1 if rule["mode"] == "drop" else 0
    elif rule["action"] == "torn":
        r.arg = rule["sectors"]


def from_struct(r) -> dict:
    action = ACTION_OF_CODE.get(int(r.action), "?")
    rule = {"action": action, "q": int(r.q), "tag": int(r.tag),
            "ops": [n for code, n in sorted(OP_NAMES.items()) if r.op_mask & (1 << code)],
            "lba": None if (r.lba_lo, r.lba_hi) == (0, U64) else (int(r.lba_lo), int(r.lba_hi)),
            "size": None if (r.size_lo, r.size_hi) == (0, U64) else (int(r.size_lo), int(r.size_hi)),
            "fua": bool(r.flags & 1), "p": None if r.prob >= ALWAYS else round(r.prob / ALWAYS, 6),
            "count": int(r.count), "errno": int(r.err), "byte": int(r.byte), "sectors": 0,
            "delay": None, "up": None, "down": None, "mode": "error"}
    if action == "delay":
        rule["delay"] = (int(r.t_lo_ns), int(r.t_hi_ns))
    elif action == "flakey":
        rule["up"], rule["down"] = int(r.t_lo_ns), int(r.t_hi_ns)
        rule["mode"] = "drop" if r.arg == 1 else "error"
    elif action == "torn":
        rule["sectors"] = int(r.arg)
    return rule


def fault_label(code: int) -> str:
    """A record's fault field -> `delay#3`."""
    if not code:
        return ""
    return f"{ACTION_OF_CODE.get(code & 0xff, '?')}#{code >> 8}"
