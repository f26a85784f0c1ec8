"""The Python face: a device as a context manager, its faults as methods.

    import ublkshell

    with ublkshell.device("mem", size="1G", recovery=True) as dev:
        dev.fail(op="write", lba=(0, 7), errno="EIO")   # sectors 0..7, both included
        dev.kill(); dev.recover()
        print(dev.stats()["ops"]["write"]["errors"])

Each method is the verb of the same name (docs/faults.md has the grammar):
keyword arguments become the rule's words, so `dev.delay("5ms", op="write",
p=0.1)` is `delay ID 5ms op=write p=0.1`. Nothing here talks to a server:
the calls act on the device's daemon and shared memory directly, as root.
"""
from .errors import UsageError
from .faults.grammar import ACTIONS


def _duration(v) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, (int, float)) and v >= 0:
        return f"{int(round(v * 1e6))}us"  # seconds, as time.sleep takes them
    raise UsageError(f"a duration is a string like '5ms' or seconds as a number, not {v!r}")


def _range(v) -> str:
    if isinstance(v, range):
        if v.step != 1 or not len(v):
            raise UsageError(f"an LBA range must be contiguous and not empty: {v!r}")
        return f"{v.start}..{v.stop - 1}"
    if isinstance(v, (tuple, list)) and len(v) == 2:
        return f"{v[0]}..{v[1]}"
    return str(v)


def rule_words(**kw) -> list[str]:
    """Keyword arguments -> rule words (`op=["read","write"]` -> `op=read,write`)."""
    words = []
    for key, v in kw.items():
        if v is None or v is False:
            continue
        if key == "fua":
            words.append("fua")
        elif key == "op":
            words.append("op=" + (v if isinstance(v, str) else ",".join(v)))
        elif key in ("lba", "size"):
            words.append(f"{key}={_range(v)}")
        elif key in ("up", "down"):
            words.append(f"{key}={_duration(v)}")
        else:
            words.append(f"{key}={v}")
    return words


def _verb(name: str):
    from .verbs import call

    return lambda args: call(name, args)


class Device:
    """A ublk device served by ublkshell; `path` is its /dev/ublkbN."""

    def __init__(self, info: dict):
        self.info = info
        self.id = int(info["id"])
        self.path = f"/dev/ublkb{self.id}"

    # -- faults --------------------------------------------------------------
    def _rule(self, action: str, values: list[str], kw: dict) -> list[int]:
        r = _verb(action)({"id": self.id, "words": values + rule_words(**kw)})
        return [x["id"] for x in r["added"]]

    def delay(self, duration, **kw) -> list[int]:
        """delay("5ms"), delay(0.005), delay(("1ms", "50ms"), p=0.1)"""
        if isinstance(duration, (tuple, list)):
            value = f"{_duration(duration[0])}..{_duration(duration[1])}"
        else:
            value = _duration(duration)
        return self._rule("delay", [value], kw)

    def badblocks(self, *sectors, **kw) -> list[int]:
        """badblocks(100, (2048, 2055), range(4096, 4100))"""
        return self._rule("badblocks", [_range(s) for s in sectors], kw)

    def faults(self) -> dict:
        return _verb("faults")({"id": self.id})

    def clear(self, rule: int | None = None) -> int:
        return _verb("clear")({"id": self.id, "rule": rule})["cleared"]

    def seed(self, seed: int | None = None) -> int:
        return _verb("seed")({"id": self.id, "seed": seed})["seed"]

    def powercut(self, keep: float = 0.0) -> dict:
        return _verb("powercut")({"id": self.id, "keep": keep})

    def mark(self, name: str) -> int:
        """A named point in the device's write log (added with log_writes=FILE); its entry number."""
        return _verb("mark")({"id": self.id, "name": name})["entry"]

    def kill(self) -> dict:
        return _verb("kill")({"id": self.id})

    def recover(self) -> dict:
        self.info = _verb("recover")({"id": self.id})
        return self.info

    # -- looking -------------------------------------------------------------
    def stats(self) -> dict:
        return _verb("stats")({"id": self.id})

    def inflight(self) -> list[dict]:
        return _verb("inflight")({"id": self.id})["tags"]

    def delete(self) -> None:
        from .devices.lifecycle import delete

        delete(self.id)

    def __enter__(self) -> "Device":
        return self

    def __exit__(self, *exc) -> None:
        import os

        if os.path.exists(f"/dev/ublkc{self.id}"):
            self.delete()

    def __repr__(self) -> str:
        return f"<ublkshell.Device {self.path} {self.info.get('describe', '')}>"


def _action_method(action: str):
    def method(self, **kw) -> list[int]:
        return self._rule(action, [], kw)

    method.__name__ = action
    method.__doc__ = f"{ACTIONS[action]}; keyword arguments are the rule's words (docs/faults.md)"
    return method


for _a in ("fail", "drop", "corrupt", "torn", "hang", "flakey"):
    setattr(Device, _a, _action_method(_a))


def device(target: str = "mem", *, size=None, file=None, queues: int = 1, depth: int = 128,
           block_size=None, max_io: str = "512k", recovery=None, powercut: bool = False,
           io_mode: str = "auto", coalesce=0, zero_copy: str = "auto", zoned: bool = False,
           zone_size=None, conv_zones=None, max_open=None, max_active=None, log_writes=None,
           log_writes_memory=None) -> Device:
    """Add a device (its IO daemon outlives this process until deleted); use it with `with`.
    io_mode, coalesce and zero_copy are `add --io-mode`, `--coalesce` and `--zero-copy`;
    zoned and the rest `--zoned`, `--zone-size`, `--conv-zones`, `--max-open`, `--max-active`;
    log_writes and log_writes_memory `--log-writes FILE` and `--log-writes-memory SIZE`."""
    args = {"target": target, "size": None if size is None else str(size), "file": file,
            "queues": queues, "depth": depth, "block_size": block_size, "max_io": max_io,
            "dev_id": -1, "powercut": powercut, "io_mode": io_mode, "coalesce": coalesce,
            "zero_copy": zero_copy, "zoned": zoned,
            "zone_size": None if zone_size is None else str(zone_size), "conv_zones": conv_zones,
            "max_open": max_open, "max_active": max_active, "log_writes": log_writes,
            "log_writes_memory": None if log_writes_memory is None else str(log_writes_memory)}
    if recovery:
        args["recovery"] = "requeue" if recovery is True else recovery
    return Device(_verb("add")(args))
