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
import math
import re

from .._native import lib
from ..errors import UsageError
from ..observe import names
from ..observe.names import fault_label  # noqa: F401 (the rule language's name for it)
from ..units import MAX_DURATION_NS, fmt_duration, parse_duration, parse_size

# what each action does, for help; which actions exist and their codes are the C side's
_HELP = {
    "delay": "add latency: `delay 5ms` or uniform `delay 1ms..50ms`",
    "fail": "complete with an error instead of doing the IO (errno=EIO by default)",
    "drop": "acknowledge writes (and flush, discard, write-zeroes) without doing them",
    "corrupt": "flip one byte of the data: reads on the way up, writes on the way down",
    "torn": "store only the first sectors=N of a write (default half) but report success",
    "hang": "never complete the IO until the rule is cleared",
    "flakey": "dm-flakey: up=DUR down=DUR, while down mode=error fails IO, mode=drop drops writes",
    "badblocks": "dm-dust: reads of the listed sectors fail until they are written again",
}
ACTIONS = {name: _HELP.get(name, "") for name in names.ACTION_CODES}
OPS = names.OP_CODES
OP_NAMES = names.OP_NAMES
WRITE_LIKE = ("write", "flush", "discard", "write_zeroes")
BAD_OPS = ("read", "write", "write_zeroes")  # reads fail, writes heal
MAX_DELAY_NS = 60 * 10**9
MIN_PHASE_NS = 10**6  # flakey up=/down=: shorter phases are below what the timer resolves
ALWAYS = 1 << 32
U64 = (1 << 64) - 1
# The bounds of the C fields each word fills (native/faults.h), checked before
# anything is computed from a number. LBAs stop at 2^63-1 so that the C side's
# `hi + 1` and sector arithmetic never wrap.
MAX_LBA = names.FAULT_MAX_LBA
MAX_COUNT = (1 << 63) - 1
MAX_SECTORS = (1 << 32) - 1
MAX_ERRNO = 4095
MAX_QUEUES = names.MAX_QUEUES
MAX_DEPTH = names.MAX_DEPTH
MAX_SECTOR_BYTES = 4096
# one rule per listed range, and a device has this many rule slots (US_FAULT_SLOTS)
MAX_RULES = names.FAULT_SLOTS
# rule->flags
FM_FUA = lib.US_FM_FUA
FM_LBA = lib.US_FM_LBA
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
# ASCII only: int() and float() also take other scripts' digits, which no one means here.
# 20 decimal digits hold every u64; more is a mistake, never a number to convert.
_UINT = re.compile(r"0[xX][0-9a-fA-F]{1,16}|[0-9]{1,20}")
_PROB = re.compile(r"(?:[0-9]{1,24}(?:\.[0-9]{0,24})?|\.[0-9]{1,24})(?:[eE][-+]?[0-9]{1,3})?")
_ERRNO_NUM = re.compile(r"[0-9]{1,4}")


class RuleError(UsageError):
    def __init__(self, col: int, msg: str):
        super().__init__(f"column {col}: {msg}")
        self.col = col
        self.reason = msg


def _show(text: str) -> str:
    """A value as the message quotes it: whole unless it is absurdly long."""
    return repr(text) if len(text) <= 24 else f"{text[:20]!r}... ({len(text)} characters)"


def _bound(n: int) -> str:
    return f"2^{n.bit_length()}-1" if n > 0xffff and (n + 1) & n == 0 else str(n)


def _uint(text: str, what: str, lo: int = 0, hi: int = MAX_LBA, zero: str = "") -> int:
    """A bounded whole number; `zero` is what to say when 0 is typed where lo is 1."""
    if not _UINT.fullmatch(text):
        raise ValueError(f"{what} {_show(text)} is not a whole number (decimal or 0x hex)")
    v = int(text, 16 if text[:2] in ("0x", "0X") else 10)
    if v == 0 and zero:
        raise ValueError(zero)
    if not lo <= v <= hi:
        raise ValueError(f"{what} {_show(text)} is out of range {lo}..{_bound(hi)}")
    return v


def _range(text: str, parse, what: str) -> tuple[int, int]:
    lo, sep, hi = text.partition("..")
    if sep and not hi:
        raise ValueError(f"{what} range {_show(text)} has nothing after '..'")
    a = parse(lo, what)
    b = parse(hi, what) if sep else a
    if b < a:
        raise ValueError(f"{what} range {_show(text)} ends before it starts")
    return a, b


def _size(text: str, what: str) -> int:
    if not text.isascii():
        raise ValueError(f"{what} {_show(text)} is not a size (e.g. 4k, 64k, 1M)")
    try:
        return parse_size(text, what)
    except UsageError as e:
        raise ValueError(str(e)) from None


def _duration(text: str, what: str) -> int:
    """ns, exact; anything up to units' day-long bound (callers narrow it)."""
    if not text.isascii():
        raise ValueError(f"{what} {_show(text)} is not a duration (e.g. 500us, 5ms, 2s)")
    try:
        return parse_duration(text, what, hi=MAX_DURATION_NS)
    except UsageError as e:
        raise ValueError(str(e)) from None


def _prob(text: str) -> float:
    if not _PROB.fullmatch(text):
        raise ValueError(f"p must be a number in 0..1, not {_show(text)}")
    p = float(text)
    if not (math.isfinite(p) and 0 <= p <= 1):
        raise ValueError(f"p={text} is outside 0..1")
    return p


def _errno_value(text: str) -> int:
    if _ERRNO_NUM.fullmatch(text):
        v = int(text)
        if not 1 <= v <= MAX_ERRNO:
            raise ValueError(f"errno {v} is out of range 1..{MAX_ERRNO}")
        return v
    name = text.upper() if text.isascii() else ""
    v = getattr(_errno, name, None) if name.startswith("E") else None
    if not isinstance(v, int) or name not in _errno.errorcode.values() or not 1 <= v <= MAX_ERRNO:
        raise ValueError(f"unknown errno {_show(text)} (e.g. EIO, ENOSPC, ETIMEDOUT, ENODATA, or a number)")
    return v


def _words(line: str):
    return [(m.start() + 1, m.group()) for m in re.finditer(r"\S+", line)]


def parse(line: str) -> list[dict]:
    """One rule line -> the rules it makes (badblocks makes one per listed range)."""
    words = _words(line)
    if not words:
        raise RuleError(1, "empty rule: give an action (" + ", ".join(ACTIONS) + ")")
    col, action = words[0]
    if action not in ACTIONS:
        raise RuleError(col, f"unknown action {_show(action)} (" + ", ".join(ACTIONS) + ")")
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
                    a, b = _range(w, _duration, "delay")
                    if b > MAX_DELAY_NS:
                        raise ValueError("a delay longer than 60s would stall `del` for as long")
                    rule["delay"] = (a, b)
                    i += 1
                    continue
                if action == "badblocks":
                    if len(bad) >= MAX_RULES:
                        raise ValueError(f"at most {MAX_RULES} ranges in one line (one rule each, "
                                         f"{MAX_RULES} rule slots); a range may be as long as you like")
                    bad.append(_range(w, _uint, "sector"))
                    i += 1
                    continue
                raise ValueError(f"unexpected word {_show(w)}")
            if key not in allowed:
                if key in MATCH_WORDS or any(key in v for v in ACTION_WORDS.values()):
                    raise ValueError(f"{action} takes no {key}=")
                raise ValueError(f"unknown word {_show(w)}")
            if key == "q":
                rule["q"] = _uint(val, "q", 0, MAX_QUEUES - 1)
            elif key == "tag":
                rule["tag"] = _uint(val, "tag", 0, MAX_DEPTH - 1)
            elif key == "op":
                for o in val.split(","):
                    if o not in OPS:
                        raise ValueError(f"unknown op {_show(o)} (" + ", ".join(OPS) + ")")
                    if o not in rule["ops"]:
                        rule["ops"].append(o)
            elif key == "lba":
                rule["lba"] = _range(val, _uint, "lba")
            elif key == "size":
                rule["size"] = _range(val, _size, "size")
            elif key == "fua":
                if eq:
                    raise ValueError(f"fua takes no value: write `fua`, not {_show(w)}")
                rule["fua"] = True
            elif key == "p":
                rule["p"] = _prob(val)
            elif key == "count":
                rule["count"] = _uint(val, "count", 1, MAX_COUNT,
                                      zero="count=0 would never apply; clear the rule instead")
            elif key == "errno":
                rule["errno"] = _errno_value(val)
            elif key == "byte":
                rule["byte"] = _uint(val, "byte", 0, MAX_SECTOR_BYTES - 1)
            elif key == "sectors":
                rule["sectors"] = _uint(val, "sectors", 1, MAX_SECTORS,
                                        zero="sectors=0 keeps nothing: use drop")
            elif key in ("up", "down"):
                rule[key] = _duration(val, key)
                if rule[key] < MIN_PHASE_NS:
                    raise ValueError(f"{key}= must be at least 1ms")
            elif key == "mode":
                if val not in ("error", "drop"):
                    raise ValueError(f"mode is error or drop, not {_show(val)}")
                rule["mode"] = val
        except ValueError as e:
            raise RuleError(col, str(e)) from None
        i += 1

    # one spelling per rule: ops in the order of their codes, each once (as the C mask reads back)
    rule["ops"] = [o for o in OPS if o in rule["ops"]]
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
        # one rule per range, of any length: what was rewritten lives in the heal log
        return [dict(rule, lba=r, ops=list(BAD_OPS)) for r in bad]
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
        words.append(fmt_duration(lo) + (f"..{fmt_duration(hi)}" if hi != lo else ""))
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
        words += [f"up={fmt_duration(rule['up'])}", f"down={fmt_duration(rule['down'])}",
                  f"mode={rule['mode']}"]
    if rule["byte"] >= 0:
        words.append(f"byte={rule['byte']}")
    if rule["sectors"]:
        words.append(f"sectors={rule['sectors']}")
    if rule["errno"]:
        words.append(f"errno={_errno.errorcode.get(rule['errno'], rule['errno'])}")
    if rule["p"] is not None:
        # repr: the shortest text that reads back as the same float
        words.append(f"p={rule['p']!r}")
    if rule["count"] >= 0:
        words.append(f"count={rule['count']}")
    return " ".join(words)


# -- to and from the shared-memory struct (native/faults.h) -------------------
_ACTION_CODES = names.ACTION_CODES
ACTION_OF_CODE = names.ACTION_NAMES


def to_struct(rule: dict, r) -> None:
    """Fill a cffi `struct us_fault_rule *`."""
    r.action = _ACTION_CODES[rule["action"]]
    r.q = rule["q"]
    r.tag = rule["tag"]
    r.op_mask = sum(1 << OPS[o] for o in set(rule["ops"]))
    # FM_LBA, not the numbers, says whether the rule has a range: `lba=0..2^63-1`
    # is a range (it never matches a FLUSH), no `lba` is none
    r.flags = (FM_FUA if rule["fua"] else 0) | (FM_LBA if rule["lba"] is not None else 0)
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
        r.arg = lib.US_FLAKEY_DROP if rule["mode"] == "drop" else lib.US_FLAKEY_ERROR
    elif rule["action"] == "torn":
        r.arg = rule["sectors"]


def from_struct(r) -> dict:
    action = ACTION_OF_CODE.get(int(r.action), "?")
    rule = {"action": action, "q": int(r.q), "tag": int(r.tag),
            "ops": [n for code, n in sorted(OP_NAMES.items()) if r.op_mask & (1 << code)],
            # a badblocks rule is its range, whatever its flags say (the file is input)
            "lba": (int(r.lba_lo), int(r.lba_hi)) if r.flags & FM_LBA or action == "badblocks" else None,
            "size": None if (r.size_lo, r.size_hi) == (0, U64) else (int(r.size_lo), int(r.size_hi)),
            "fua": bool(r.flags & FM_FUA), "p": None if r.prob >= ALWAYS else round(r.prob / ALWAYS, 6),
            "count": int(r.count), "errno": int(r.err), "byte": int(r.byte), "sectors": 0,
            "delay": None, "up": None, "down": None, "mode": "error"}
    if action == "delay":
        rule["delay"] = (int(r.t_lo_ns), int(r.t_hi_ns))
    elif action == "flakey":
        rule["up"], rule["down"] = int(r.t_lo_ns), int(r.t_hi_ns)
        rule["mode"] = "drop" if r.arg == lib.US_FLAKEY_DROP else "error"
    elif action == "torn":
        rule["sectors"] = int(r.arg)
    return rule
