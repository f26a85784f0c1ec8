#!/usr/bin/env python3
"""What ublkshell's observability and fault engine cost on the IO path, as ratios
measured inside one run.

Runs as root on a kernel with ublk_drv (on most hosts: inside the bundled VM, via
`ublkshell vm -- .venv/bin/python bench/overhead.py`). Stdlib only, and it drives
ublkshell through its CLI, as a user would.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

from common import (BenchError, UblkDevices, add_output_options, fio, last_line, main_loop,
                    positive_int, render_table, run)

DEPTHS = (1, 64)
AREA = 256 << 20            # fio stays in [0, AREA) of every device
NULL_SIZE, MEM_SIZE = "1G", "512M"
RULE_SPACING = 1024         # sectors between two rules, all of them past AREA
GOAL = 0.95
MAX_RULES = 256             # US_FAULT_SLOTS


def rule_count(text: str) -> int:
    n = positive_int(text)
    if n > MAX_RULES:
        raise argparse.ArgumentTypeError(f"a device holds at most {MAX_RULES} fault rules")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="overhead.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Measure what ublkshell's observability and fault engine cost per IO, as the\n"
            "ratio B/A of fio 4k randread IOPS (io_uring, O_DIRECT, iodepth 1 and 64,\n"
            f"inside the first {AREA >> 20} MiB of each device):\n"
            "  records, null  A: add -t null --size 1G --no-records   B: the same, records on\n"
            "  records, mem   A: add -t mem --size 512M --no-records  B: the same, records on\n"
            "  fault rules    A: the null device, no rules            B: the same device with\n"
            "                 --rules non-matching rules (one `badblocks` line: a rule per\n"
            "                 8-sector range, all past the area fio reads)\n"
            "  trace reader   A: the null device                      B: the same while one\n"
            "                 `ublkshell trace ID --json > /dev/null` streams every IO\n"
            "(\"records\" are the counters, latency histograms and the IO record rings that\n"
            "stats, lat, top and trace read; --no-records keeps none, fault rules still apply.)\n\n"
            "A and B run back to back for each depth, in alternating order from round to\n"
            "round; the ratio is the median of the per-round ratios, which holds up when the\n"
            "host's load shifts between rounds. After the run every rule must show 0 hits in\n"
            "`ublkshell faults ID --json` (else the benchmark fails: fio strayed into them),\n"
            "and the trace reader's lost records, if it reported any, are printed.\n\n"
            "Absolute numbers mean little under an emulated CPU; read the ratios, and only\n"
            "compare numbers taken in the same run."),
        epilog=(
            "Needs root, /dev/ublk-control and fio. On a kernel without ublk_drv:\n"
            "  .venv/bin/ublkshell vm -- .venv/bin/python bench/overhead.py --markdown\n"
            "About 2.5 minutes per round under emulation, plus one for the setup."),
    )
    p.add_argument("--runtime", type=positive_int, default=5,
                   help="seconds per fio run (default 5)")
    p.add_argument("--rounds", type=positive_int, default=5,
                   help="times every comparison is repeated; medians are reported (default 5)")
    p.add_argument("--rules", type=rule_count, default=64,
                   help=f"non-matching fault rules in the rules comparison (default 64, at most {MAX_RULES})")
    add_output_options(p)
    return p


@dataclass
class Side:
    label: str
    dev_id: int
    node: str
    rules: bool = False
    trace: bool = False


@dataclass
class Comparison:
    name: str
    a: Side
    b: Side


class Overhead(UblkDevices):
    """The devices, the rule state of the null device and the trace reader; cleanup()
    undoes all of them."""

    def __init__(self, nr_rules: int):
        super().__init__()
        self.nr_rules = nr_rules
        self.rules_on: dict[int, bool] = {}
        self.rule_checks = 0
        self.trace: subprocess.Popen | None = None

    def add(self, target: str, size: str, records: bool) -> tuple[int, str]:
        args = ["-t", target, "--size", size, "-q", "1", "-d", "128"]
        return self.add_ublk(args if records else args + ["--no-records"])

    def rule_line(self) -> list[str]:
        # One badblocks line makes one rule per range of at most 64 sectors, so a single
        # CLI call installs them all and the rules can be made afresh every round; a
        # rule whose LBAs miss the IO is rejected by the same range test whatever its action.
        first = AREA // 512
        return [f"{first + i * RULE_SPACING}..{first + i * RULE_SPACING + 7}"
                for i in range(self.nr_rules)]

    def set_rules(self, dev_id: int, on: bool) -> None:
        if self.rules_on.get(dev_id, False) == on:
            return
        if on:
            self.ublkshell("badblocks", str(dev_id), *self.rule_line())
        else:
            self.check_rules(dev_id)
            self.ublkshell("clear", str(dev_id))
        self.rules_on[dev_id] = on

    def check_rules(self, dev_id: int) -> None:
        """Every rule installed and none ever matched: else B measured something else."""
        try:
            rules = json.loads(self.ublkshell("faults", str(dev_id), "--json"))["rules"]
        except (ValueError, KeyError):
            raise BenchError(f"ublkshell faults {dev_id} --json: unreadable output") from None
        if len(rules) != self.nr_rules:
            raise BenchError(f"device {dev_id} has {len(rules)} fault rules, "
                             f"expected {self.nr_rules}")
        hit = [r for r in rules if r.get("hits", 0)]
        if hit:
            raise BenchError(f"{len(hit)} fault rule(s) matched IO (rule #{hit[0]['id']} "
                             f"`{hit[0]['text']}`: {hit[0]['hits']} hits): the rules must lie "
                             "outside the area fio reads")
        self.rule_checks += 1

    def start_trace(self, dev_id: int) -> None:
        self.trace = subprocess.Popen(
            [*self.ublk, "trace", str(dev_id), "--json"], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        # The reader follows the record rings from the moment it maps the device's stats
        # file; wait for that, or fio's first seconds would run without a reader.
        stats = f"/ublkb{dev_id}.stats"
        deadline = time.monotonic() + 60
        while True:
            if self.trace.poll() is not None:
                err = self.trace.stderr.read()
                raise BenchError(f"ublkshell trace {dev_id} exited before fio started: "
                                 f"{last_line(err)}")
            try:
                with open(f"/proc/{self.trace.pid}/maps") as f:
                    if any(line.rstrip().endswith(stats) for line in f):
                        return
            except FileNotFoundError:
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"ublkshell trace {dev_id} did not open the device within 60 s")
            time.sleep(0.05)

    def stop_trace(self) -> int:
        """Ctrl-C the reader, as a user would; returns the records it says it lost."""
        proc = self.trace
        if proc.poll() is not None:
            raise BenchError(f"ublkshell trace died during fio (exit {proc.returncode}): "
                             f"{last_line(proc.stderr.read())}")
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            raise BenchError("ublkshell trace did not stop within 60 s of SIGINT") from None
        # only now: until it has exited, cleanup() must still be able to kill it
        self.trace = None
        if proc.returncode != 0:
            raise BenchError(f"ublkshell trace failed (exit {proc.returncode}): {last_line(err)}")
        m = re.search(r"(\d+) records lost", err)
        return int(m.group(1)) if m else 0

    def ios_recorded(self, dev_id: int) -> int:
        try:
            return int(json.loads(self.ublkshell("stats", str(dev_id), "--json"))
                       ["ops"]["read"]["ios"])
        except (ValueError, KeyError):
            raise BenchError(f"ublkshell stats {dev_id} --json: unreadable output") from None

    def cleanup(self) -> list[str]:
        if self.trace is not None:
            self.trace.kill()  # a no-op if it has already exited
            self.trace.communicate()
            self.trace = None
        return super().cleanup()


def measure(args, bench: Overhead) -> dict:
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    null_id, null = bench.add("null", NULL_SIZE, records=True)
    null_off_id, null_off = bench.add("null", NULL_SIZE, records=False)
    mem_id, mem = bench.add("mem", MEM_SIZE, records=True)
    mem_off_id, mem_off = bench.add("mem", MEM_SIZE, records=False)
    log(f"devices: null {null}, null --no-records {null_off}, mem {mem}, "
        f"mem --no-records {mem_off}")
    # Reads of a mem hole never touch a page; fill what fio will read so the mem
    # comparison moves real data.
    for node in (mem, mem_off):
        run(["fio", "--name=fill", f"--filename={node}", "--rw=write", "--bs=1M",
             f"--size={AREA}", "--ioengine=psync", "--direct=1", "--output-format=terse"],
            f"filling {node}", timeout=600)
    # The emulator translates the daemons' and fio's hot paths on first use; a
    # throwaway run per device keeps that out of the first measurement.
    for node in (null, null_off, mem, mem_off):
        fio(node, "randread", 64, 1, size=AREA)

    comparisons = [
        Comparison("records, null", Side("--no-records", null_off_id, null_off),
                   Side("records on", null_id, null)),
        Comparison("records, mem", Side("--no-records", mem_off_id, mem_off),
                   Side("records on", mem_id, mem)),
        Comparison("fault rules, null", Side("0 rules", null_id, null),
                   Side(f"{args.rules} rules", null_id, null, rules=True)),
        Comparison("trace reader, null", Side("no reader", null_id, null),
                   Side("1 trace --json", null_id, null, trace=True)),
    ]
    samples = {(c.name, qd): {"a": [], "b": [], "lost": []} for c in comparisons for qd in DEPTHS}
    for r in range(args.rounds):
        for c in comparisons:
            # A B | B A in one round, A B | B A over the depths reversed in the next: each
            # depth alternates which side goes first, and rule changes stay one per round.
            for qd in (DEPTHS if r % 2 == 0 else DEPTHS[::-1]):
                pair = ("a", "b") if (r + DEPTHS.index(qd)) % 2 == 0 else ("b", "a")
                for key in pair:
                    side = getattr(c, key)
                    bench.set_rules(side.dev_id, side.rules)
                    if side.trace:
                        bench.start_trace(side.dev_id)
                    iops = fio(side.node, "randread", qd, args.runtime, size=AREA)
                    extra = ""
                    if side.trace:
                        lost = bench.stop_trace()
                        samples[c.name, qd]["lost"].append(lost)
                        extra = f"  ({lost} records lost)"
                    samples[c.name, qd][key].append(iops)
                    log(f"round {r + 1}/{args.rounds}  {c.name:<18} qd{qd:<3} {side.label:<15} "
                        f"{iops:>9.0f} IOPS{extra}")
    bench.set_rules(null_id, False)  # checks the hits once more if a round ended with rules

    # --no-records must really keep nothing, and the others must record, or the
    # records comparison compared nothing.
    for dev_id, records in ((null_id, True), (null_off_id, False), (mem_id, True),
                            (mem_off_id, False)):
        n = bench.ios_recorded(dev_id)
        if (n > 0) != records:
            raise BenchError(f"device {dev_id} recorded {n} reads, expected "
                             f"{'some' if records else 'none (--no-records)'}")

    rows = []
    for c in comparisons:
        for qd in DEPTHS:
            s = samples[c.name, qd]
            paired = [b / a for a, b in zip(s["a"], s["b"]) if a]
            ratio = statistics.median(paired) if paired else None
            goal = GOAL if not c.name.startswith("trace") else None
            row = {
                "comparison": c.name, "workload": f"randread qd{qd}",
                "a": c.a.label, "b": c.b.label,
                "iops_a": statistics.median(s["a"]), "iops_b": statistics.median(s["b"]),
                "ratio": ratio, "round_ratios": paired, "goal": goal,
                "goal_met": None if goal is None or ratio is None else ratio >= goal,
                "rounds_at_goal": None if goal is None else sum(x >= goal for x in paired),
                "samples": {"a": s["a"], "b": s["b"]},
            }
            if s["lost"]:
                row["records_lost"] = s["lost"]
                # what the reader had to keep up with: IOs fio completed while it ran
                row["records_total"] = [round(x * args.runtime) for x in s["b"]]
            rows.append(row)
    return {
        "date": datetime.date.today().isoformat(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "runtime_s": args.runtime,
        "rounds": args.rounds,
        "rules": args.rules,
        "rule_checks": bench.rule_checks,
        "fio": f"rw=randread bs=4k ioengine=io_uring direct=1 numjobs=1 size={AREA >> 20}M",
        "devices": {"null": f"-t null --size {NULL_SIZE} -q 1 -d 128",
                    "mem": f"-t mem --size {MEM_SIZE} -q 1 -d 128"},
        "rows": rows,
    }


def render(result: dict, markdown: bool) -> str:
    head = ["comparison (A vs B)", "workload", "IOPS A", "IOPS B", "ratio B/A",
            f"goal >= {GOAL}", "per-round ratios"]
    body = []
    for r in result["rows"]:
        goal = "-" if r["goal_met"] is None else (
            f"{'met' if r['goal_met'] else 'MISSED'} ({r['rounds_at_goal']}/{len(r['round_ratios'])})")
        body.append([f"{r['comparison']} ({r['a']} vs {r['b']})", r["workload"],
                     f"{r['iops_a']:.0f}", f"{r['iops_b']:.0f}",
                     f"{r['ratio']:.3f}" if r["ratio"] is not None else "-", goal,
                     " ".join(f"{x:.3f}" for x in r["round_ratios"])])
    setup = (f"fio 4k randread io_uring direct in the first {AREA >> 20} MiB, "
             f"{result['runtime_s']} s per run, median of {result['rounds']} rounds, "
             f"{result['cpus']} CPUs, devices 1 queue x 128")
    notes = [f"goal column: whether the median ratio reaches {GOAL}, and in how many "
             "rounds the pair did",
             f"fault rules: {result['rules']} rules, 0 hits in each of "
             f"{result['rule_checks']} checks (ublkshell faults --json)"]
    for r in result["rows"]:
        if "records_lost" in r:
            pairs = ", ".join(f"{lost} of ~{total}" for lost, total in
                              zip(r["records_lost"], r["records_total"]))
            notes.append(f"trace reader {r['workload']}: records lost per run {pairs}")
    if markdown:
        return "\n".join([f"Measured {result['date']}, kernel `{result['kernel']}`: {setup}.", "",
                          *render_table(head, body, True, left=2), "",
                          *(f"- {n}." for n in notes)])
    return "\n".join([f"{result['date']}  kernel {result['kernel']}", setup, "",
                      *render_table(head, body, False, left=2), "", *notes])


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    bench = Overhead(args.rules)
    return main_loop("overhead", "overhead.py", ("fio",), args,
                     lambda: measure(args, bench), bench.cleanup,
                     lambda result: render(result, args.markdown))


if __name__ == "__main__":
    sys.exit(main())
