#!/usr/bin/env python3
"""Compare the ublkshell loop target with the kernel's loop driver on the same file.

Runs as root on a kernel with ublk_drv (on most hosts: inside the bundled VM, via
`ublkshell vm -- .venv/bin/python bench/loop_vs_kernel.py`). Stdlib only, and it drives
ublkshell through its CLI, as a user would.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHM = "/dev/shm"
CONTROL = "/dev/ublk-control"
WORKLOADS = [(rw, qd) for rw in ("randread", "randwrite") for qd in (1, 64)]


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="loop_vs_kernel.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Measure 4k random IO (fio, io_uring, O_DIRECT) on three devices:\n"
            "  kernel loop     losetup --direct-io=on over a file on /dev/shm\n"
            "  ublkshell loop  `ublkshell add -t loop` over the same file (1 queue x 128)\n"
            "  ublkshell null  `ublkshell add -t null` (1 queue): the ublk round trip alone\n"
            "for randread and randwrite at iodepth 1 and 64. Kernel loop and ublkshell loop\n"
            "run back to back for each workload and the whole matrix is repeated --rounds\n"
            "times; the table shows the median IOPS, and as ratio the median over rounds of\n"
            "ublkshell loop / kernel loop, each pair measured back to back.\n\n"
            "Absolute numbers mean little under an emulated CPU; read the ratios, and only\n"
            "compare numbers taken in the same run."),
        epilog=(
            "Needs root, /dev/ublk-control, fio and losetup. On a kernel without ublk_drv:\n"
            "  .venv/bin/ublkshell vm -- .venv/bin/python bench/loop_vs_kernel.py --markdown"),
    )
    p.add_argument("--size", type=parse_size, default=parse_size("512M"),
                   help="backing file size on /dev/shm (default 512M)")
    p.add_argument("--runtime", type=positive_int, default=6,
                   help="seconds per fio run (default 6)")
    p.add_argument("--rounds", type=positive_int, default=2,
                   help="times the whole matrix is repeated; the median is reported (default 2)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--markdown", action="store_true",
                     help="print a markdown table with the date and kernel version")
    out.add_argument("--json", action="store_true",
                     help="print every sample and the medians as JSON")
    return p


def run(cmd: list[str], what: str, timeout: float | None = None) -> str:
    try:
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what}: no answer after {timeout:.0f} s") from None
    if p.returncode != 0:
        detail = (p.stderr.strip() or p.stdout.strip()).splitlines()
        raise BenchError(f"{what} failed (exit {p.returncode}): {detail[-1] if detail else '?'}")
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


def fio(dev: str, rw: str, qd: int, runtime: int) -> float:
    out = run(["fio", "--name=bench", f"--filename={dev}", "--ioengine=io_uring", "--direct=1",
               "--bs=4k", f"--rw={rw}", f"--iodepth={qd}", "--numjobs=1", "--time_based",
               f"--runtime={runtime}", "--randrepeat=0", "--norandommap",
               "--output-format=json"],
              f"fio {rw} qd{qd} on {dev}", timeout=runtime * 10 + 60)
    # fio may print warnings before the JSON document.
    start = out.find("{")
    try:
        job = json.loads(out[start:])["jobs"][0]
    except (ValueError, KeyError, IndexError):
        raise BenchError(f"fio {rw} qd{qd} on {dev}: unreadable JSON output") from None
    if job.get("error"):
        raise BenchError(f"fio {rw} qd{qd} on {dev}: error {job['error']}")
    return float(job["read" if rw == "randread" else "write"]["iops"])


class Bench:
    """Owns every resource it creates so that cleanup() can undo exactly those."""

    def __init__(self, size: int):
        self.size = size
        self.ublk = ublkshell_cmd()
        self.file: str | None = None
        self.loopdev: str | None = None
        self.ublk_ids: list[int] = []
        self.loop_dio: str = "?"

    def make_file(self) -> None:
        fd, self.file = tempfile.mkstemp(prefix="ublkshell-bench-", suffix=".img", dir=SHM)
        os.close(fd)
        # fio fills its buffers with random bytes once and reuses them: incompressible
        # enough for a tmpfs file and far faster than /dev/urandom under emulation.
        run(["fio", "--name=fill", f"--filename={self.file}", "--rw=write", "--bs=1M",
             f"--size={self.size}", "--ioengine=psync", "--end_fsync=1",
             "--output-format=terse"], "filling the backing file", timeout=600)
        if os.path.getsize(self.file) != self.size:
            raise BenchError(f"backing file is {os.path.getsize(self.file)} bytes, "
                             f"expected {self.size}")

    def add_kernel_loop(self) -> str:
        out = run(["losetup", "--direct-io=on", "--find", "--show", self.file],
                  "losetup", timeout=60)
        self.loopdev = out.strip().splitlines()[-1]
        # losetup silently falls back to buffered IO when the file refuses O_DIRECT,
        # which would make the comparison unfair; record what the kernel settled on.
        try:
            self.loop_dio = run(["losetup", "--noheadings", "--output", "DIO", self.loopdev],
                                "losetup --list", timeout=30).strip() or "?"
        except BenchError:
            self.loop_dio = "?"
        return self.loopdev

    def add_ublk(self, args: list[str]) -> str:
        out = run([*self.ublk, "add", *args, "--json"], f"ublkshell add {' '.join(args)}",
                  timeout=120)
        line = next((ln for ln in reversed(out.splitlines()) if ln.startswith("{")), "")
        try:
            dev_id = int(json.loads(line)["id"])
        except (ValueError, KeyError):
            raise BenchError(f"ublkshell add printed no device: {out.strip()[:200]!r}") from None
        self.ublk_ids.append(dev_id)
        node = f"/dev/ublkb{dev_id}"
        wait_for_node(node)
        return node

    def cleanup(self) -> list[str]:
        problems = []
        for dev_id in reversed(self.ublk_ids):
            try:
                run([*self.ublk, "del", str(dev_id)], f"ublkshell del {dev_id}", timeout=120)
            except BenchError as e:
                problems.append(str(e))
        self.ublk_ids.clear()
        if self.loopdev:
            try:
                run(["losetup", "-d", self.loopdev], f"losetup -d {self.loopdev}", timeout=60)
            except BenchError as e:
                problems.append(str(e))
            self.loopdev = None
        if self.file:
            try:
                os.unlink(self.file)
            except FileNotFoundError:
                pass
            except OSError as e:
                problems.append(f"removing {self.file}: {e}")
            self.file = None
        return problems


def measure(args, bench: Bench) -> dict:
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    log(f"filling {bench.size >> 20} MiB backing file on {SHM}")
    bench.make_file()
    devs = {
        "kernel": bench.add_kernel_loop(),
        "ublk": bench.add_ublk(["-t", "loop", "-f", bench.file, "-q", "1", "-d", "128"]),
        "null": bench.add_ublk(["-t", "null", "--size", "1G", "-q", "1"]),
    }
    log(f"devices: kernel loop {devs['kernel']} (dio={bench.loop_dio}), "
        f"ublkshell loop {devs['ublk']}, ublkshell null {devs['null']}")
    # The emulator translates fio's hot paths on first use; without a throwaway run
    # the very first measurement (always kernel loop) would pay for that alone.
    fio(devs["kernel"], "randread", 1, 1)

    samples = {f"{rw} qd{qd}": {k: [] for k in devs} for rw, qd in WORKLOADS}
    for r in range(1, args.rounds + 1):
        for rw, qd in WORKLOADS:
            name = f"{rw} qd{qd}"
            # Kernel and ublkshell loop back to back, so drift in the host's load hits
            # both sides of a ratio alike.
            for kind in ("kernel", "ublk", "null"):
                iops = fio(devs[kind], rw, qd, args.runtime)
                samples[name][kind].append(iops)
                log(f"round {r}/{args.rounds}  {name:<13} {kind:<6} {iops:>10.0f} IOPS")

    rows = []
    for name, s in samples.items():
        med = {k: statistics.median(v) for k, v in s.items()}
        paired = [u / k for u, k in zip(s["ublk"], s["kernel"]) if k]
        rows.append({
            "workload": name,
            "kernel_loop_iops": med["kernel"],
            "ublkshell_loop_iops": med["ublk"],
            # Each round's pair ran back to back under the same host load; the median of
            # those ratios survives a round where the whole machine sped up or slowed
            # down, which a quotient of two medians (possibly from different rounds) does not.
            "ratio": statistics.median(paired) if paired else None,
            "ublkshell_null_iops": med["null"],
            "samples": {"kernel_loop": s["kernel"], "ublkshell_loop": s["ublk"],
                        "ublkshell_null": s["null"]},
            "round_ratios": paired,
        })
    return {
        "date": datetime.date.today().isoformat(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "file_size": bench.size,
        "runtime_s": args.runtime,
        "rounds": args.rounds,
        "kernel_loop_dio": bench.loop_dio,
        "fio": "ioengine=io_uring direct=1 bs=4k numjobs=1",
        "rows": rows,
    }


def render(result: dict, markdown: bool) -> str:
    head = ["workload", "kernel loop IOPS", "ublkshell loop IOPS", "ratio (ublkshell/kernel)",
            "ublkshell null IOPS"]
    body = [[r["workload"], f"{r['kernel_loop_iops']:.0f}", f"{r['ublkshell_loop_iops']:.0f}",
             f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-",
             f"{r['ublkshell_null_iops']:.0f}"] for r in result["rows"]]
    setup = (f"{result['file_size'] >> 20} MiB file on tmpfs, fio 4k io_uring direct, "
             f"{result['runtime_s']} s per run, median of {result['rounds']} rounds, "
             f"{result['cpus']} CPUs, kernel loop dio={result['kernel_loop_dio']}")
    spread = "per-round ratios: " + "; ".join(
        f"{r['workload']} {' '.join(f'{x:.2f}' for x in r['round_ratios'])}"
        for r in result["rows"])
    if markdown:
        lines = [f"Measured {result['date']}, kernel `{result['kernel']}`: {setup}.", "",
                 "| " + " | ".join(head) + " |",
                 "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines + ["", spread + "."])
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = lambda row: "  ".join(  # noqa: E731
        c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    return "\n".join([f"{result['date']}  kernel {result['kernel']}", setup, "",
                      fmt(head), fmt(["-" * w for w in widths]), *map(fmt, body), "", spread])


def preflight() -> None:
    if os.geteuid() != 0 or not os.path.exists(CONTROL):
        why = "not root" if os.geteuid() != 0 else f"no {CONTROL} (ublk_drv not loaded?)"
        raise BenchError(f"{why}: run it as root on a kernel with ublk_drv, e.g. "
                         "`.venv/bin/ublkshell vm -- .venv/bin/python bench/loop_vs_kernel.py`")
    for tool in ("fio", "losetup"):
        if not shutil.which(tool) and not shutil.which(tool, path="/usr/sbin:/sbin"):
            raise BenchError(f"{tool} not found in PATH")
    if not os.path.isdir(SHM):
        raise BenchError(f"{SHM} is missing: the backing file lives on tmpfs there")


def _raise_interrupt(signum, _frame):
    # SIGTERM/SIGHUP (e.g. the VM harness timing out) must unwind through the same
    # finally as Ctrl-C, or devices and the loop device outlive us.
    raise KeyboardInterrupt(signum)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    os.environ["PATH"] = os.environ.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin"
    try:
        preflight()
    except BenchError as e:
        print(f"loop_vs_kernel: {e}", file=sys.stderr)
        return 2
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)

    bench = Bench(args.size)
    status, result = 0, None
    try:
        result = measure(args, bench)
    except BenchError as e:
        print(f"loop_vs_kernel: {e}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt as e:
        signum = e.args[0] if e.args else signal.SIGINT
        print(f"loop_vs_kernel: {signal.Signals(signum).name}, cleaning up", file=sys.stderr)
        status = 128 + signum
    finally:
        # Cleanup must not be cut short by a second Ctrl-C or a repeated SIGTERM.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        for problem in bench.cleanup():
            print(f"loop_vs_kernel: cleanup: {problem}", file=sys.stderr)
            status = status or 1
    if result is not None:
        print(json.dumps(result, indent=2) if args.json else render(result, args.markdown))
    return status


if __name__ == "__main__":
    sys.exit(main())
