"""The progress line `replay` and `crashtest` keep on a terminal's stderr."""
import sys
import time


class Progress:
    """`WHAT: NOUN i/N (p%)` and a suffix, a few times a second and at the last one, on a
    terminal's stderr only; done() wipes it."""

    def __init__(self, what: str, noun: str, total: int):
        self.what, self.noun, self.total, self.shown = what, noun, total, 0.0
        self.on = sys.stderr.isatty() and total > 0

    def __call__(self, done: int, suffix: str = "") -> None:
        now = time.monotonic()
        if self.on and (now - self.shown > 0.25 or done == self.total):
            self.shown = now
            print(f"\r{self.what}: {self.noun} {done}/{self.total} ({100 * done // self.total}%){suffix}",
                  end="", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.on and self.shown:
            print("\r\033[K", end="", file=sys.stderr, flush=True)
