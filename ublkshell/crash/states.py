"""Which crash states a dm-log-writes log allows, and which of them `crashtest` tries.

A log in dm-log-writes' order holds, before each persistence point (a FLUSH, or a FUA write),
the writes that point made durable, in the order they completed. A crash before the point
completes may leave any subset of them on the media (the block layer and a disk's cache may
persist them in any order), on top of everything before the previous point. After the last
point, the writes logged at the log's end (never flushed) are such an epoch too.

The subsets of an epoch of k writes are 2^k; `crashtest` tries a bounded set of them (the
model in docs/crashtest.md): every prefix (the writes persisted in completion order, which is
also what a crash between two completions leaves), every single write dropped, and N random
subsets drawn from a seed. What the bound leaves out: subsets with two or more writes missing
that no random draw hit."""
from __future__ import annotations

import random
from dataclasses import dataclass

from .logwrites import DISCARD, FUA, Entry


@dataclass(frozen=True)
class Epoch:
    number: int                 # from 0, in log order
    base: int                   # the last entry of the state every crash here starts from (-1: none)
    writes: tuple               # the epoch's write and discard entries, in log order
    point: Entry | None         # the FLUSH or FUA entry that ends it; None: the log's unflushed end


@dataclass(frozen=True)
class State:
    epoch: Epoch
    applied: tuple              # positions in epoch.writes, ascending
    why: str                    # prefix, drop, random, all

    @property
    def skipped(self) -> tuple:
        """Entry numbers of the epoch's writes up to the last one applied that are left out."""
        if not self.applied:
            return ()
        last = self.applied[-1]
        kept = set(self.applied)
        return tuple(self.epoch.writes[i].index for i in range(last + 1) if i not in kept)

    @property
    def last_entry(self) -> int:
        """The last entry a replay of this state goes through."""
        return self.epoch.writes[self.applied[-1]].index if self.applied else self.epoch.base


def epochs(entries: list[Entry], start: int) -> list[Epoch]:
    """The epochs after entry `start` (the state every crash is built on top of)."""
    out, pending, base = [], [], start
    for e in entries:
        if e.index <= start:
            continue
        if e.flags & FUA and e.data_at >= 0:
            # a FUA write is durable once it completes: its own epoch, with what precedes it
            out.append(Epoch(len(out), base, tuple(pending) + (e,), e))
            pending, base = [], e.index
        elif e.persists:
            out.append(Epoch(len(out), base, tuple(pending), e))
            pending, base = [], e.index
        elif e.data_at >= 0 or e.flags & DISCARD:
            pending.append(e)
    if pending:
        out.append(Epoch(len(out), base, tuple(pending), None))
    return out


def states(epoch: Epoch, n_random: int, rng: random.Random, first: bool) -> list[State]:
    """The states tried in one epoch, each once, among them all of it (the state once its
    point completed, which the next epoch starts from, so it never tries 'none' again).
    first: also the state with none of it (the base itself)."""
    k = len(epoch.writes)
    if not k:
        return [State(epoch, (), "base")] if first else []
    prefixes = [("prefix", tuple(range(j))) for j in range(0 if first else 1, k)]
    drops = [("drop", tuple(p for p in range(k) if p != i)) for i in range(k)] if k >= 2 else []
    randoms = [("random", tuple(p for p in range(k) if rng.random() < 0.5))
               for _ in range(n_random if k >= 2 else 0)]
    # kinds taken in turn: a run that --max-states cuts short still saw some of each
    seen, out = set(), []
    for group in _round_robin(prefixes, drops, randoms) + [("all", tuple(range(k)))]:
        why, applied = group
        if applied not in seen:
            seen.add(applied)
            out.append(State(epoch, applied, why))
    return out


def _round_robin(*lists) -> list:
    out = []
    for i in range(max(map(len, lists), default=0)):
        out += [lst[i] for lst in lists if i < len(lst)]
    return out
