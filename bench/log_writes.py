#!/usr/bin/env python3
"""What `add --log-writes` costs, beside what the kernel's dm-log-writes costs, in one run.

Runs as root on a kernel with ublk_drv and dm-log-writes (the bundled VM:
`ublkshell vm -- .venv/bin/python bench/log_writes.py`). Stdlib only; it drives ublkshell
through its CLI, as a user would.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile

from common import (BenchError, UblkDevices, add_matrix_options, add_output_options, fio, main_loop,
                    paired, median, ratio, render_table, run)

SHM = "/dev/shm"
DEPTHS = (1, 32)
FSYNC_EVERY = 64   # a flush every 64 writes: what the logs hold in memory stays bounded
ENV = dict(os.environ, DM_DISABLE_UDEV="1")  # the VM has no udev: dmsetup makes the nodes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="log_writes.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Measure 4k random writes (fio, io_uring, O_DIRECT, a flush every 64 writes) with and\n"
            "without a write log, on two stacks, in one run:\n"
            "  ublkshell   A: `add -t mem`           B: the same with --log-writes (a log on /dev/shm)\n"
            "  kernel      A: dm-linear over a loop  B: dm-log-writes over the same loop, its log a\n"
            "              device (a loop on a /dev/shm file)\n"
            "at iodepth 1 and 32. Every run gets a fresh device and an empty log. The table shows\n"
            "median IOPS, as ratio the median over rounds of B/A (each pair back to back), and at qd 1 the\n"
            "time the log adds to each write (1/IOPS B - 1/IOPS A).\n\n"
            "Absolute numbers mean little under an emulated CPU: compare the two stacks' ratios."),
        epilog="  .venv/bin/ublkshell vm -- .venv/bin/python bench/log_writes.py --markdown")
    add_matrix_options(p, "256M", 5, rounds=3, size_help="device size")
    add_output_options(p)
    return p


class Bench(UblkDevices):
    def __init__(self, size: int):
        super().__init__()
        self.size = size
        self.dir = tempfile.mkdtemp(prefix="ublkshell-bench-lw-", dir=SHM)
        self.loops: list[str] = []
        self.dm: list[str] = []

    def add_mem(self, logged: bool) -> tuple[int, str]:
        args = ["-t", "mem", "--size", str(self.size)]
        if logged:
            log = os.path.join(self.dir, "ublk.log")
            if os.path.exists(log):
                os.unlink(log)
            args += ["--log-writes", log]
        return self.add_ublk(args)

    def drop_ublk(self, dev_id: int) -> None:
        self.ublkshell("del", str(dev_id))
        self.ublk_ids.remove(dev_id)

    def _loop(self, name: str, size: int) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.truncate(size)
        dev = run(["losetup", "--find", "--show", path], "losetup", timeout=60).strip()
        self.loops.append(dev)
        return dev

    def add_dm(self, logged: bool) -> str:
        data = self._loop("data.img", self.size)
        name = f"ublkshell-bench-{os.getpid()}"
        if logged:
            log = self._loop("log.img", 16 * self.size)
            table = f"0 {self.size // 512} log-writes {data} {log}"
        else:
            table = f"0 {self.size // 512} linear {data} 0"
        run(["dmsetup", "create", name, "--table", table], "dmsetup create", timeout=60)
        self.dm.append(name)
        return f"/dev/mapper/{name}"

    def _drop_kernel(self, problems: list | None = None) -> None:
        """The dm devices, then their loop devices. problems: collect what fails and go on
        (cleanup); None: raise at the first, leaving the rest for cleanup."""
        for owned, cmd in ((self.dm, ["dmsetup", "remove"]), (self.loops, ["losetup", "-d"])):
            while owned:
                try:
                    run([*cmd, owned[0]], " ".join(cmd), timeout=120)
                except BenchError as e:
                    if problems is None:
                        raise
                    problems.append(str(e))
                owned.pop(0)

    def drop_kernel(self) -> None:
        self._drop_kernel()
        for name in ("data.img", "log.img"):
            path = os.path.join(self.dir, name)
            if os.path.exists(path):
                os.unlink(path)

    def cleanup(self) -> list[str]:
        problems = super().cleanup()
        self._drop_kernel(problems)
        run(["rm", "-rf", self.dir], "rm", timeout=60)
        return problems


def one(bench: Bench, stack: str, logged: bool, qd: int, runtime: int) -> float:
    extra = (f"--fsync={FSYNC_EVERY}",)
    if stack == "ublkshell":
        dev_id, node = bench.add_mem(logged)
        try:
            return fio(node, "randwrite", qd, runtime, size=bench.size, extra=extra)
        finally:
            bench.drop_ublk(dev_id)
    node = bench.add_dm(logged)
    try:
        return fio(node, "randwrite", qd, runtime, size=bench.size, extra=extra)
    finally:
        bench.drop_kernel()


def measure(args, bench: Bench) -> dict:
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    run(["modprobe", "dm-log-writes"], "modprobe dm-log-writes", timeout=60)
    samples = {(s, qd): {"a": [], "b": []} for s in ("ublkshell", "kernel") for qd in DEPTHS}
    for r in range(args.rounds):
        for stack in ("ublkshell", "kernel"):
            for qd in DEPTHS:
                pair = (False, True) if (r + DEPTHS.index(qd)) % 2 == 0 else (True, False)
                for logged in pair:
                    iops = one(bench, stack, logged, qd, args.runtime)
                    samples[stack, qd]["b" if logged else "a"].append(iops)
                    log(f"round {r + 1}/{args.rounds}  {stack:<9} qd{qd:<3} "
                        f"{'log' if logged else 'no log':<7} {iops:>9.0f} IOPS")
    rows = []
    for (stack, qd), s in samples.items():
        a, b = median(s["a"]), median(s["b"])
        rows.append({"stack": stack, "qd": qd, "iops_a": a, "iops_b": b,
                     "ratio": paired(s["b"], s["a"]),
                     "added_us": (1e6 / b - 1e6 / a) if a and b and qd == 1 else None,
                     "samples": s})
    return {"date": datetime.date.today().isoformat(), "kernel": platform.release(),
            "cpus": os.cpu_count(), "runtime_s": args.runtime, "rounds": args.rounds,
            "fio": f"rw=randwrite bs=4k ioengine=io_uring direct=1 fsync={FSYNC_EVERY} size={bench.size >> 20}M",
            "rows": rows}


def render(result: dict, markdown: bool) -> str:
    head = ["stack", "workload", "IOPS no log", "IOPS log", "log / no log", "added per write"]
    body = [[r["stack"], f"randwrite qd{r['qd']}", f"{r['iops_a']:.0f}", f"{r['iops_b']:.0f}",
             ratio(r["ratio"]), "-" if r["added_us"] is None else f"{r['added_us']:.1f} us"]
            for r in result["rows"]]
    lines = render_table(head, body, markdown)
    if markdown:
        lines.insert(0, f"{result['date']}, kernel {result['kernel']}, {result['cpus']} CPUs, "
                        f"{result['rounds']} rounds of {result['runtime_s']} s, fio {result['fio']}\n")
    return "\n".join(lines)


def main() -> int:
    args = build_parser().parse_args()
    holder: list[Bench] = []

    def measure_() -> dict:
        holder.append(Bench(args.size))
        return measure(args, holder[0])

    return main_loop("log_writes", "log_writes.py", ("fio", "losetup", "dmsetup"), args, measure_,
                     lambda: holder[0].cleanup() if holder else [],
                     lambda r: render(r, args.markdown))


if __name__ == "__main__":
    sys.exit(main())
