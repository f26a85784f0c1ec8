#!/usr/bin/env python3
"""Compare the ublkshell loop target with the kernel's loop driver on the same file.

Runs as root on a kernel with ublk_drv (on most hosts: inside the bundled VM, via
`ublkshell vm -- .venv/bin/python bench/loop_vs_kernel.py`). Stdlib only, and it drives
ublkshell through its CLI, as a user would.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile

from common import (BenchError, UblkDevices, add_matrix_options, add_output_options, fio, main_loop,
                    render_table, run)

SHM = "/dev/shm"
WORKLOADS = [(rw, qd) for rw in ("randread", "randwrite") for qd in (1, 64)]


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
    add_matrix_options(p, "512M", 6)
    add_output_options(p)
    return p


class Bench(UblkDevices):
    """Owns every resource it creates so that cleanup() can undo exactly those."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size
        self.file: str | None = None
        self.loopdev: str | None = None
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

    def cleanup(self) -> list[str]:
        problems = super().cleanup()
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
        "ublk": bench.add_ublk(["-t", "loop", "-f", bench.file, "-q", "1", "-d", "128"])[1],
        "null": bench.add_ublk(["-t", "null", "--size", "1G", "-q", "1"])[1],
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
        return "\n".join([f"Measured {result['date']}, kernel `{result['kernel']}`: {setup}.", "",
                          *render_table(head, body, True), "", spread + "."])
    return "\n".join([f"{result['date']}  kernel {result['kernel']}", setup, "",
                      *render_table(head, body, False), "", spread])


def check_shm() -> None:
    if not os.path.isdir(SHM):
        raise BenchError(f"{SHM} is missing: the backing file lives on tmpfs there")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    bench = Bench(args.size)
    return main_loop("loop_vs_kernel", "loop_vs_kernel.py", ("fio", "losetup"), args,
                     lambda: measure(args, bench), bench.cleanup,
                     lambda result: render(result, args.markdown), extra_check=check_shm)


if __name__ == "__main__":
    sys.exit(main())
