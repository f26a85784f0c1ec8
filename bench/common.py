"""What the benchmark scripts share: running commands with one-line errors, fio,
ublkshell devices made through the CLI, the preflight, the table and the main
loop that cleans up on every exit path.

Stdlib only. The scripts import it as `common` (Python puts the running
script's directory first on sys.path).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

CONTROL = "/dev/ublk-control"


class BenchError(Exception):
    """One-line reason the benchmark cannot go on."""


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)i?b?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 512M, 1G)")
    n = int(m.group(1)) * 1024 ** " kmgt".index(m.group(2).lower() or " ")
    if n < 16 << 20 or n % (1 << 20):
        raise argparse.ArgumentTypeError("size must be a whole number of MiB, at least 16M")
    return n


def positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def add_matrix_options(p: argparse.ArgumentParser, size: str, runtime: int, rounds: int = 2,
                       size_help: str = "backing file size on /dev/shm") -> None:
    """--size, --runtime and --rounds of a script that runs a matrix of fio jobs in rounds."""
    p.add_argument("--size", type=parse_size, default=parse_size(size), help=f"{size_help} (default {size})")
    p.add_argument("--runtime", type=positive_int, default=runtime,
                   help=f"seconds per fio run (default {runtime})")
    p.add_argument("--rounds", type=positive_int, default=rounds,
                   help=f"times the whole matrix is repeated; medians are reported (default {rounds})")


def add_output_options(p: argparse.ArgumentParser) -> None:
    out = p.add_mutually_exclusive_group()
    out.add_argument("--markdown", action="store_true",
                     help="print a markdown table with the date and kernel version")
    out.add_argument("--json", action="store_true",
                     help="print every sample and the medians as JSON")


def last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else "?"


def run(cmd: list[str], what: str, timeout: float | None = None) -> str:
    try:
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what}: no answer after {timeout:.0f} s") from None
    if p.returncode != 0:
        raise BenchError(f"{what} failed (exit {p.returncode}): "
                         f"{last_line(p.stderr) if p.stderr.strip() else last_line(p.stdout)}")
    return p.stdout


def ublkshell_cmd() -> list[str]:
    # The venv's own script first: a PATH lookup could find another install.
    sibling = Path(sys.executable).with_name("ublkshell")
    if sibling.is_file():
        return [str(sibling)]
    found = shutil.which("ublkshell")
    return [found] if found else [sys.executable, "-m", "ublkshell"]


def wait_for_node(path: str, seconds: float = 15.0) -> None:
    # devtmpfs creates the node asynchronously after START_DEV; nothing else waits for it.
    deadline = time.monotonic() + seconds
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise BenchError(f"{path} did not appear within {seconds:.0f} s")
        time.sleep(0.05)


def fio(dev: str, rw: str, qd: int, runtime: int, size: int | None = None, jobs: int = 1,
        bs: str = "4k", batch: int = 1, extra: tuple = ()) -> float:
    """IOPS of a time-based fio run of bs blocks (jobs processes, summed); size= keeps it inside
    [0, size). batch > 1: fio submits IOs batch at a time and reaps them batch at a time (as a
    client with many IOs ready at once does), not one by one as fio does by default."""
    area = [f"--size={size}"] if size else []
    if batch > 1:
        area += [f"--iodepth_batch_submit={batch}", f"--iodepth_batch_complete_min={batch}"]
    out = run(["fio", "--name=bench", f"--filename={dev}", "--ioengine=io_uring", "--direct=1",
               f"--bs={bs}", f"--rw={rw}", f"--iodepth={qd}", f"--numjobs={jobs}", "--group_reporting",
               "--time_based",
               f"--runtime={runtime}", "--randrepeat=0", "--norandommap", *area,
               *extra, "--output-format=json"],
              f"fio {rw} qd{qd} on {dev}", timeout=runtime * 10 + 60)
    # fio may print warnings before the JSON document.
    start = out.find("{")
    try:
        job = json.loads(out[start:])["jobs"][0]
    except (ValueError, KeyError, IndexError):
        raise BenchError(f"fio {rw} qd{qd} on {dev}: unreadable JSON output") from None
    if job.get("error"):
        raise BenchError(f"fio {rw} qd{qd} on {dev}: error {job['error']}")
    return float(job["read" if "read" in rw else "write"]["iops"])


class UblkDevices:
    """The ublkshell devices a benchmark made, so that cleanup() deletes exactly those."""

    def __init__(self):
        self.ublk = ublkshell_cmd()
        self.ublk_ids: list[int] = []

    def ublkshell(self, *args: str, timeout: float = 120) -> str:
        return run([*self.ublk, *args], f"ublkshell {' '.join(args)}", timeout=timeout)

    def add_ublk(self, args: list[str]) -> tuple[int, str]:
        out = self.ublkshell("add", *args, "--json")
        line = next((ln for ln in reversed(out.splitlines()) if ln.startswith("{")), "")
        try:
            dev_id = int(json.loads(line)["id"])
        except (ValueError, KeyError):
            raise BenchError(f"ublkshell add printed no device: {out.strip()[:200]!r}") from None
        self.ublk_ids.append(dev_id)
        node = f"/dev/ublkb{dev_id}"
        wait_for_node(node)
        return dev_id, node

    def cleanup(self) -> list[str]:
        problems = []
        for dev_id in reversed(self.ublk_ids):
            try:
                self.ublkshell("del", str(dev_id))
            except BenchError as e:
                problems.append(str(e))
        self.ublk_ids.clear()
        return problems


def preflight(script: str, tools: tuple[str, ...]) -> None:
    if os.geteuid() != 0 or not os.path.exists(CONTROL):
        why = "not root" if os.geteuid() != 0 else f"no {CONTROL} (ublk_drv not loaded?)"
        raise BenchError(f"{why}: run it as root on a kernel with ublk_drv, e.g. "
                         f"`.venv/bin/ublkshell vm -- .venv/bin/python bench/{script}`")
    for tool in tools:
        if not shutil.which(tool) and not shutil.which(tool, path="/usr/sbin:/sbin"):
            raise BenchError(f"{tool} not found in PATH")


def render_table(head: list[str], body: list[list[str]], markdown: bool, left: int = 1) -> list[str]:
    """The first `left` columns are text, the rest numbers (right-aligned)."""
    if markdown:
        return ["| " + " | ".join(head) + " |",
                "|" + "|".join(["---"] * left + ["---:"] * (len(head) - left)) + "|",
                *("| " + " | ".join(row) + " |" for row in body)]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = lambda row: "  ".join(  # noqa: E731
        c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    return [fmt(head), fmt(["-" * w for w in widths]), *map(fmt, body)]


def _raise_interrupt(signum, _frame):
    # SIGTERM/SIGHUP (e.g. the VM harness timing out) must unwind through the same
    # finally as Ctrl-C, or devices and the loop device outlive us.
    raise KeyboardInterrupt(signum)


def main_loop(prog: str, script: str, tools: tuple[str, ...], args, measure: Callable[[], dict],
              cleanup: Callable[[], list[str]], render: Callable[[dict], str],
              extra_check: Callable[[], None] | None = None) -> int:
    """Preflight, measure, clean up whatever happened, print. Exit 2: cannot run here;
    1: the run failed; 128+N: killed by signal N (after cleaning up)."""
    os.environ["PATH"] = os.environ.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin"
    try:
        preflight(script, tools)
        if extra_check:
            extra_check()
    except BenchError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)

    status, result = 0, None
    try:
        result = measure()
    except BenchError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt as e:
        signum = e.args[0] if e.args else signal.SIGINT
        print(f"{prog}: {signal.Signals(signum).name}, cleaning up", file=sys.stderr)
        status = 128 + signum
    finally:
        # Cleanup must not be cut short by a second Ctrl-C or a repeated SIGTERM.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        for problem in cleanup():
            print(f"{prog}: cleanup: {problem}", file=sys.stderr)
            status = status or 1
    if result is not None:
        print(json.dumps(result, indent=2) if args.json else render(result))
    return status


def median(values) -> float | None:
    """The median of the values that were measured (None: not measured), or None."""
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def paired(a: list, b: list) -> float | None:
    """The median of per-round ratios a/b: each pair was measured back to back."""
    return median([x / y if y else None for x, y in zip(a, b)])


def ratio(v, fmt=".2f", suffix="x") -> str:
    return "-" if v is None else f"{v:{fmt}}{suffix}"


def ring_of(devices: UblkDevices, dev_id: int) -> dict:
    """A device's crossing counters (`stats --json`'s ring)."""
    return json.loads(devices.ublkshell("stats", str(dev_id), "--json"))["ring"]


def fio_crossings(devices: UblkDevices, dev_id: int, node: str, rw: str, qd: int, runtime: int,
                  **kw) -> tuple[float, dict]:
    """fio()'s IOPS on a ublkshell device, and what its IOs cost: io_uring_enter calls per IO
    and IOs per commit (None where the run committed nothing)."""
    before = ring_of(devices, dev_id)
    iops = fio(node, rw, qd, runtime, **kw)
    after = ring_of(devices, dev_id)
    d = {k: after[k] - before[k] for k in ("committed", "enters", "commits")}
    return iops, {"enters/io": d["enters"] / d["committed"] if d["committed"] else None,
                  "ios/commit": d["committed"] / d["commits"] if d["commits"] else None}
