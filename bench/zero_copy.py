#!/usr/bin/env python3
"""Zero copy (`add --zero-copy on`) against the copying path (`off`) on the loop target over
a file in RAM and over a file on ext4, and on the mem target, beside the kernel loop driver on
the same files, in IOPS and crossings per IO.

Runs as root on a kernel whose ublk_drv offers UBLK_F_AUTO_BUF_REG and UBLK_F_USER_COPY
(the bundled VM's does: `ublkshell vm -- .venv/bin/python bench/zero_copy.py`). Stdlib only;
it drives ublkshell through its CLI, as a user would.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile

from common import (BenchError, add_matrix_options, add_output_options, fio, fio_crossings, main_loop,
                    median, paired, ratio, render_table, run)
from loop_vs_kernel import SHM, Bench, check_shm

COPY = ("off", "on")
# where the data lives: loop over the tmpfs file, loop over a file on ext4, and mem (no peer)
STORES = ("tmpfs", "ext4", "mem")
WORKLOADS = [(rw, bs, qd) for bs in ("4k", "128k") for rw in ("randread", "randwrite") for qd in (1, 64)]


class Ext4File:
    """A file on ext4 (on a kernel loop device over a tmpfs image): where loop serves through
    O_DIRECT and io_uring, as on a disk, with kernel loop (dio) on the same file as the peer."""

    def __init__(self, size: int):
        self.size = size
        self.image = self.imgdev = self.mnt = self.file = self.loopdev = None
        self.loop_dio = "?"

    def make(self) -> None:
        fd, self.image = tempfile.mkstemp(prefix="ublkshell-bench-ext4-", suffix=".img", dir=SHM)
        os.ftruncate(fd, self.size + (64 << 20))
        os.close(fd)
        self.imgdev = run(["losetup", "--find", "--show", self.image], "losetup", timeout=60).split()[-1]
        run(["mkfs.ext4", "-q", "-F", self.imgdev], "mkfs.ext4", timeout=300)
        self.mnt = tempfile.mkdtemp(prefix="ublkshell-bench-mnt-")
        run(["mount", self.imgdev, self.mnt], "mount", timeout=60)
        self.file = os.path.join(self.mnt, "bench.img")
        run(["fio", "--name=fill", f"--filename={self.file}", "--rw=write", "--bs=1M",
             f"--size={self.size}", "--ioengine=psync", "--end_fsync=1", "--output-format=terse"],
            "filling the ext4 file", timeout=600)
        self.loopdev = run(["losetup", "--direct-io=on", "--find", "--show", self.file],
                           "losetup", timeout=60).split()[-1]
        self.loop_dio = run(["losetup", "--noheadings", "--output", "DIO", self.loopdev],
                            "losetup --list", timeout=30).strip() or "?"

    def cleanup(self) -> list[str]:
        problems = []
        steps = [(["losetup", "-d", self.loopdev], self.loopdev), (["umount", self.mnt], self.mnt),
                 (["losetup", "-d", self.imgdev], self.imgdev)]
        for cmd, needed in steps:
            if needed:
                try:
                    run(cmd, " ".join(cmd), timeout=60)
                except BenchError as e:
                    problems.append(str(e))
        if self.mnt:
            shutil.rmtree(self.mnt, ignore_errors=True)
        if self.image:
            os.unlink(self.image)
        self.image = self.imgdev = self.mnt = self.file = self.loopdev = None
        return problems


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zero_copy.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Measure random IO (fio, io_uring, O_DIRECT; 4k and 128k blocks, iodepth 1 and 64)\n"
            "on ublkshell's loop target over a file on /dev/shm and over a file on ext4, and on\n"
            "its mem target, each added with --zero-copy off (the driver copies every READ and\n"
            "WRITE through the daemon's buffer) and --zero-copy on (the request's pages are\n"
            "registered with the queue's io_uring and moved by fixed-buffer IO), beside the\n"
            "kernel loop driver on the same files. All in the default IO mode (batch where the\n"
            "kernel offers it).\n\n"
            "Beside IOPS it prints io_uring_enter calls per IO from `ublkshell stats --json`.\n"
            "Ratios are medians over rounds of per-round ratios (each pair measured back to\n"
            "back); only compare numbers from the same run."),
        epilog=(
            "Needs root, /dev/ublk-control (with auto buffer registration), fio, losetup and\n"
            "mkfs.ext4. On a kernel without ublk_drv:\n"
            "  .venv/bin/ublkshell vm -- .venv/bin/python bench/zero_copy.py --markdown"),
    )
    add_matrix_options(p, "256M", 4, size_help="size of each backing file, and of the mem devices")
    add_output_options(p)
    return p


def measure(args, bench: Bench, ext4: Ext4File) -> dict:
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    log(f"filling a {bench.size >> 20} MiB file on /dev/shm and one on ext4")
    bench.make_file()
    ext4.make()
    kernel = {"tmpfs": bench.add_kernel_loop(), "ext4": ext4.loopdev}
    devs = {}
    for zc in COPY:
        devs["tmpfs", zc] = bench.add_ublk(["-t", "loop", "-f", bench.file, "--zero-copy", zc])
        devs["ext4", zc] = bench.add_ublk(["-t", "loop", "-f", ext4.file, "--zero-copy", zc])
        devs["mem", zc] = bench.add_ublk(["-t", "mem", "--size", str(bench.size), "--zero-copy", zc])
    listed = {d["id"]: d["flags"] for d in json.loads(bench.ublkshell("list", "--json"))}
    for (store, zc), (dev_id, _node) in devs.items():
        if ("auto_buf_reg" in listed[dev_id]) != (zc == "on"):
            raise BenchError(f"{store} --zero-copy {zc}: the device came up with flags {listed[dev_id]}")
    fio(kernel["tmpfs"], "randread", 1, 1)  # the emulator translates fio's hot paths once, outside the numbers

    samples: dict = {}
    for r in range(1, args.rounds + 1):
        for rw, bs, qd in WORKLOADS:
            name = f"{rw} {bs} qd{qd}"
            s = samples.setdefault(name, {})
            for store, node in kernel.items():
                s.setdefault(f"{store} kernel", []).append(fio(node, rw, qd, args.runtime, bs=bs))
                log(f"round {r}/{args.rounds}  {name:<20} {store:<5} kernel loop  {s[f'{store} kernel'][-1]:>9.0f} IOPS")
            for (store, zc), (dev_id, node) in devs.items():
                iops, cost = fio_crossings(bench, dev_id, node, rw, qd, args.runtime, bs=bs)
                key = f"{store} {zc}"
                s.setdefault(key, []).append(iops)
                s.setdefault(key + " enters/io", []).append(cost["enters/io"])
                log(f"round {r}/{args.rounds}  {name:<20} {store:<5} zero-copy {zc:<3} {iops:>9.0f} IOPS")

    rows = []
    for store in STORES:
        for name, s in samples.items():
            row = {"store": store, "workload": name, "samples": {k: v for k, v in s.items() if k.startswith(store)}}
            peer = s.get(f"{store} kernel")
            row["kernel_loop_iops"] = median(peer) if peer else None
            for zc in COPY:
                key = f"{store} {zc}"
                row[zc] = {"iops": median(s[key]), "enters_per_io": median(s[key + " enters/io"]),
                           "vs_kernel_loop": paired(s[key], peer) if peer else None}
            row["on/off"] = paired(s[f"{store} on"], s[f"{store} off"])
            rows.append(row)
    return {"date": datetime.date.today().isoformat(), "kernel": platform.release(),
            "cpus": os.cpu_count(), "file_size": bench.size, "runtime_s": args.runtime,
            "rounds": args.rounds, "kernel_loop_dio": {"tmpfs": bench.loop_dio, "ext4": ext4.loop_dio},
            "rows": rows}


def render(result: dict, markdown: bool) -> str:
    head = ["store", "workload", "kernel loop", "copy", "zero copy", "zero copy/copy", "enters/IO copy, zero copy"]
    body = []
    for r in result["rows"]:
        def cell(d):
            return f"{d['iops']:.0f}" + (f" ({ratio(d['vs_kernel_loop'])})" if d["vs_kernel_loop"] else "")
        body.append([r["store"] if r["store"] != "mem" else "mem target", r["workload"],
                     "-" if r["kernel_loop_iops"] is None else f"{r['kernel_loop_iops']:.0f}",
                     cell(r["off"]), cell(r["on"]), ratio(r["on/off"]),
                     f"{ratio(r['off']['enters_per_io'], '.3f', '')}, {ratio(r['on']['enters_per_io'], '.3f', '')}"])
    setup = (f"loop over a {result['file_size'] >> 20} MiB file on tmpfs and over one on ext4 (on a "
             f"kernel loop device over tmpfs), and a mem device of that size; fio io_uring direct, "
             f"{result['runtime_s']} s per run, median of {result['rounds']} rounds, {result['cpus']} CPUs, "
             f"kernel loop dio: {', '.join(f'{k} {v}' for k, v in result['kernel_loop_dio'].items())}; "
             "IOPS (ratio to kernel loop on the same file "
             "in brackets)")
    if markdown:
        return "\n".join([f"Measured {result['date']}, kernel `{result['kernel']}`: {setup}.", "",
                          *render_table(head, body, True, left=2)])
    return "\n".join([f"{result['date']}  kernel {result['kernel']}", setup, "",
                      *render_table(head, body, False, left=2)])


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    bench, ext4 = Bench(args.size), Ext4File(args.size)
    return main_loop("zero_copy", "zero_copy.py", ("fio", "losetup", "mkfs.ext4"), args,
                     lambda: measure(args, bench, ext4), lambda: bench.cleanup() + ext4.cleanup(),
                     lambda result: render(result, args.markdown), extra_check=check_shm)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:  # pragma: no cover - main_loop reports these itself
        print(f"zero_copy: {e}", file=sys.stderr)
        sys.exit(1)
