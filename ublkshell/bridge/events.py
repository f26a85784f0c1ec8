"""The server's log (stderr, one line per event) and its memory of recent events, which
the `events` request returns."""
import os
import sys
import time

from ..devices import ids as devids

MAX_EVENTS = 200


def log(msg: str) -> None:
    sys.stderr.write(f"{time.strftime('%H:%M:%S')} ublkshell-server[{os.getpid()}]: {msg}\n")
    sys.stderr.flush()


def one_line(text: str) -> str:
    return " ".join(text.split())


class Events:
    def __init__(self):
        self.recent = []

    def __call__(self, kind: str, **fields) -> None:
        # an event names its device as people type it (`device`), beside the numeric handle
        named = {"device": devids.name(fields["id"])} if "id" in fields else {}
        ev = {"t": time.time(), "kind": kind, **fields, **named}
        self.recent = (self.recent + [ev])[-MAX_EVENTS:]
        shown = {k: devids.name(v) if k == "id" else v for k, v in fields.items()}
        log(f"{kind}: " + ", ".join(f"{k}={v}" for k, v in shown.items()))

    def last(self, n: int) -> list:
        return self.recent[-n:]
