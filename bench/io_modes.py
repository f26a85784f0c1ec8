#!/usr/bin/env python3
"""Compare ublkshell's two ublk IO modes (batch and per-tag) with each other and with the
kernel loop driver, in IOPS and in crossings per IO.

Runs as root on a kernel with ublk_drv that offers UBLK_F_BATCH_IO (the bundled VM's does:
`ublkshell vm -- .venv/bin/python bench/io_modes.py`). Stdlib only; it drives ublkshell
through its CLI, as a user would.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

from common import (BenchError, add_matrix_options, add_output_options, fio, fio_crossings, main_loop,
                    median, paired, ratio, render_table)
from loop_vs_kernel import Bench, check_shm

MODES = ("per-tag", "batch")
# (rw, iodepth, queues, client batch): fio runs one job per queue; a client batch of 16 submits
# and reaps 16 IOs at a time, so that the block layer hands the queue many tags at once
WORKLOADS = [(rw, qd, 1, 1) for rw in ("randread", "randwrite") for qd in (1, 64)]
WORKLOADS += [(rw, 64, 1, 16) for rw in ("randread", "randwrite")]
WORKLOADS += [(rw, 64, 2, 1) for rw in ("randread", "randwrite")]


def workload_name(rw: str, qd: int, q: int, batch: int) -> str:
    return f"{rw} qd{qd}" + (f" b{batch}" if batch > 1 else "") + f" x{q}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="io_modes.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Measure 4k random IO (fio, io_uring, O_DIRECT) for each ublkshell IO mode\n"
            "(`add --io-mode per-tag` and `--io-mode batch`) on the loop target over a file on\n"
            "/dev/shm and on the null target, beside the kernel loop driver on the same file:\n"
            "randread and randwrite at iodepth 1 and 64 on one queue (one fio job), at iodepth\n"
            "64 with fio submitting and reaping 16 IOs at a time (b16: the block layer then\n"
            "hands a queue many tags at once, which is what batch IO gathers), and at iodepth\n"
            "64 on two queues (two fio jobs; kernel loop gets two jobs too, so the scaling\n"
            "from one to two is compared with its own).\n\n"
            "Beside IOPS it prints what each IO cost in crossings, from `ublkshell stats --json`\n"
            "(ring: io_uring_enter calls per IO, IOs per commit). Under an emulated CPU those\n"
            "counts do not move with the host's noise the way IOPS do. Ratios are medians over\n"
            "rounds of per-round ratios (each pair measured back to back); only compare numbers\n"
            "from the same run."),
        epilog=(
            "Needs root, /dev/ublk-control (with batch IO), fio and losetup. On a kernel without\n"
            "ublk_drv:\n"
            "  .venv/bin/ublkshell vm -- .venv/bin/python bench/io_modes.py --markdown"),
    )
    add_matrix_options(p, "256M", 5)
    p.add_argument("--coalesce", default="0",
                   help="pass `add --coalesce` to every ublkshell device (default 0: off)")
    add_output_options(p)
    return p


def measure(args, bench: Bench) -> dict:
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    log(f"filling {bench.size >> 20} MiB backing file on /dev/shm")
    bench.make_file()
    kernel = bench.add_kernel_loop()
    devs = {}
    for mode in MODES:
        for q in (1, 2):
            common = ["-q", str(q), "--io-mode", mode, "--coalesce", args.coalesce]
            devs[mode, "loop", q] = bench.add_ublk(["-t", "loop", "-f", bench.file, *common])
            devs[mode, "null", q] = bench.add_ublk(["-t", "null", "--size", "1G", *common])
    fio(kernel, "randread", 1, 1)  # the emulator translates fio's hot paths once, outside the numbers

    samples: dict = {}
    for r in range(1, args.rounds + 1):
        for rw, qd, q, batch in WORKLOADS:
            name = workload_name(rw, qd, q, batch)
            s = samples.setdefault(name, {})
            s.setdefault("kernel", []).append(fio(kernel, rw, qd, args.runtime, jobs=q, batch=batch))
            for (mode, target, nq), (dev_id, node) in devs.items():
                if nq != q:
                    continue
                iops, cost = fio_crossings(bench, dev_id, node, rw, qd, args.runtime, jobs=q, batch=batch)
                key = f"{mode} {target}"
                s.setdefault(key, []).append(iops)
                s.setdefault(key + " enters/io", []).append(cost["enters/io"])
                s.setdefault(key + " ios/commit", []).append(cost["ios/commit"])
                log(f"round {r}/{args.rounds}  {name:<22} {key:<14} {iops:>9.0f} IOPS  "
                    f"{ratio(cost['enters/io'], '.3f', '')} enters/IO")
            log(f"round {r}/{args.rounds}  {name:<22} {'kernel loop':<14} {s['kernel'][-1]:>9.0f} IOPS")

    rows = []
    for name, s in samples.items():
        row = {"workload": name, "kernel_loop_iops": median(s["kernel"]), "samples": s}
        for mode in MODES:
            for target in ("loop", "null"):
                key = f"{mode} {target}"
                row[key] = {"iops": median(s[key]), "enters_per_io": median(s[key + " enters/io"]),
                            "ios_per_commit": median(s[key + " ios/commit"])}
            row[f"{mode} loop/kernel"] = paired(s[f"{mode} loop"], s["kernel"])
        for target in ("loop", "null"):
            row[f"batch/per-tag {target}"] = paired(s[f"batch {target}"], s[f"per-tag {target}"])
        rows.append(row)
    scaling = {}
    for rw in ("randread", "randwrite"):
        one, two = samples[workload_name(rw, 64, 1, 1)], samples[workload_name(rw, 64, 2, 1)]
        scaling[rw] = {k: paired(two[k], one[k]) for k in ("kernel", *[f"{m} {t}" for m in MODES
                                                                        for t in ("loop", "null")])}
    return {"date": datetime.date.today().isoformat(), "kernel": platform.release(),
            "cpus": os.cpu_count(), "file_size": bench.size, "runtime_s": args.runtime,
            "rounds": args.rounds, "coalesce": args.coalesce, "kernel_loop_dio": bench.loop_dio,
            "rows": rows, "scaling_1_to_2_queues": scaling}


def render(result: dict, markdown: bool) -> str:
    head = ["workload", "kernel loop", "per-tag loop", "batch loop", "batch/per-tag loop",
            "per-tag null", "batch null", "batch/per-tag null", "enters/IO per-tag, batch (null)",
            "IOs/commit batch (null)"]
    body = []
    for r in result["rows"]:
        body.append([r["workload"], f"{r['kernel_loop_iops']:.0f}",
                     f"{r['per-tag loop']['iops']:.0f} ({ratio(r['per-tag loop/kernel'])})",
                     f"{r['batch loop']['iops']:.0f} ({ratio(r['batch loop/kernel'])})",
                     ratio(r["batch/per-tag loop"]), f"{r['per-tag null']['iops']:.0f}",
                     f"{r['batch null']['iops']:.0f}", ratio(r["batch/per-tag null"]),
                     f"{ratio(r['per-tag null']['enters_per_io'], '.3f', '')}, "
                     f"{ratio(r['batch null']['enters_per_io'], '.3f', '')}",
                     ratio(r["batch null"]["ios_per_commit"], ".1f", "")])
    setup = (f"{result['file_size'] >> 20} MiB file on tmpfs, fio 4k io_uring direct, "
             f"{result['runtime_s']} s per run, median of {result['rounds']} rounds, {result['cpus']} CPUs, "
             f"--coalesce {result['coalesce']}, kernel loop dio={result['kernel_loop_dio']}; "
             "IOPS (loop: ratio to kernel loop in brackets)")
    scale = "scaling from 1 to 2 queues (2 jobs) at qd64: " + "; ".join(
        f"{rw}: " + ", ".join(f"{k} {ratio(v)}" for k, v in s.items())
        for rw, s in result["scaling_1_to_2_queues"].items())
    if markdown:
        return "\n".join([f"Measured {result['date']}, kernel `{result['kernel']}`: {setup}.", "",
                          *render_table(head, body, True), "", scale + "."])
    return "\n".join([f"{result['date']}  kernel {result['kernel']}", setup, "",
                      *render_table(head, body, False), "", scale])


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    bench = Bench(args.size)
    return main_loop("io_modes", "io_modes.py", ("fio", "losetup"), args,
                     lambda: measure(args, bench), bench.cleanup,
                     lambda result: render(result, args.markdown), extra_check=check_shm)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:  # pragma: no cover - main_loop reports these itself
        print(f"io_modes: {e}", file=sys.stderr)
        sys.exit(1)
