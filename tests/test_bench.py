"""The benchmark scripts on a machine where they cannot measure: --help teaches, and
a missing ublk_drv or a missing root gives one line and a non-zero exit, before any
device is made. (Measuring needs the real driver: see docs/benchmarks.md.)"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
SCRIPTS = ["overhead.py", "loop_vs_kernel.py", "io_modes.py", "zero_copy.py", "log_writes.py"]
CONTROL = "/dev/ublk-control"
NOBODY = 65534


def bench_module(name):
    """A bench script as a module (they import `common` from their own directory)."""
    import importlib

    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


def bench(script, *args, python=sys.executable, **kw):
    return subprocess.run([python, str(BENCH / script), *args], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL, **kw)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_says_what_it_measures_and_how_to_run_it(script):
    p = bench(script, "--help")
    assert p.returncode == 0, p.stderr
    for text in ("--rounds", "--runtime", "--markdown", "--json", "ratio",
                 f"ublkshell vm -- .venv/bin/python bench/{script}"):
        assert text in p.stdout, text


def test_overhead_help_names_every_comparison():
    out = bench("overhead.py", "--help").stdout
    for text in ("--no-records", "-t mem", "non-matching", "ublkshell trace ID --json",
                 "ublkshell faults ID --json", "iodepth 1 and 64"):
        assert text in out, text


@pytest.mark.skipif(os.path.exists(CONTROL), reason=f"{CONTROL} exists: the benchmark would run")
@pytest.mark.parametrize("script", SCRIPTS)
def test_without_ublk_drv_one_line_and_exit_2(script):
    p = bench(script, "--rounds", "1")
    name = script.removesuffix(".py")
    assert p.returncode == 2
    assert p.stdout == ""
    reason = "not root" if os.geteuid() != 0 else f"no {CONTROL} (ublk_drv not loaded?)"
    assert p.stderr.startswith(f"{name}: {reason}: run it as root on a kernel with ublk_drv")
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr


def _python_for_nobody():
    # The venv's interpreter may live under a home nobody can enter; the scripts are
    # stdlib only, so any Python 3.10+ that nobody can run will do.
    for python in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
        try:
            p = subprocess.run([python, "-c", "import sys; assert sys.version_info >= (3, 10)"],
                               user=NOBODY, group=NOBODY, extra_groups=[], capture_output=True,
                               timeout=30)
        except OSError:
            continue
        if p.returncode == 0:
            return python
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the script as another user")
@pytest.mark.parametrize("script", SCRIPTS)
def test_not_root_one_line_and_exit_2(script):
    python = _python_for_nobody()
    if python is None:
        pytest.skip("no Python interpreter the user nobody may run")
    p = bench(script, python=python, user=NOBODY, group=NOBODY, extra_groups=[], cwd="/")
    assert p.returncode == 2, p.stderr
    assert p.stdout == ""
    assert p.stderr.startswith(f"{script.removesuffix('.py')}: not root: run it as root")
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr


def test_overhead_refuses_more_rules_than_a_device_holds():
    p = bench("overhead.py", "--rules", "257")
    assert p.returncode == 2
    assert "--rules: a device holds at most 256 fault rules" in p.stderr


def test_zero_copy_table_has_ratios_and_no_peer_for_mem():
    zero_copy = bench_module("zero_copy")
    side = lambda iops, vs, enters: {"iops": iops, "vs_kernel_loop": vs, "enters_per_io": enters}  # noqa: E731
    rows = [{"store": "ext4", "workload": "randread 4k qd64", "kernel_loop_iops": 1000.0,
             "off": side(400.0, 0.4, 0.5), "on": side(800.0, 0.8, 0.6), "on/off": 2.0},
            {"store": "mem", "workload": "randread 4k qd64", "kernel_loop_iops": None,
             "off": side(500.0, None, 0.5), "on": side(600.0, None, None), "on/off": 1.2}]
    result = {"date": "2026-12-01", "kernel": "k", "cpus": 2, "file_size": 256 << 20, "runtime_s": 4,
              "rounds": 2, "kernel_loop_dio": {"tmpfs": "1", "ext4": "1"}, "rows": rows}
    md = zero_copy.render(result, True).splitlines()
    assert "| ext4 | randread 4k qd64 | 1000 | 400 (0.40x) | 800 (0.80x) | 2.00x | 0.500, 0.600 |" in md
    assert "| mem target | randread 4k qd64 | - | 500 | 600 | 1.20x | 0.500, - |" in md
    assert "dio: tmpfs 1, ext4 1" in md[0]


def test_io_modes_table_names_the_client_batch_and_the_scaling():
    io_modes = bench_module("io_modes")
    side = lambda iops, e, c: {"iops": iops, "enters_per_io": e, "ios_per_commit": c}  # noqa: E731
    row = {"workload": io_modes.workload_name("randread", 64, 1, 16), "kernel_loop_iops": 2000.0,
           "per-tag loop": side(1000.0, 0.06, 1.0), "batch loop": side(1500.0, 0.04, 20.0),
           "per-tag null": side(1200.0, 0.05, 1.0), "batch null": side(1800.0, 0.045, 22.5),
           "per-tag loop/kernel": 0.5, "batch loop/kernel": 0.75, "batch/per-tag loop": 1.5,
           "batch/per-tag null": 1.5}
    result = {"date": "2026-12-02", "kernel": "k", "cpus": 2, "file_size": 256 << 20, "runtime_s": 5,
              "rounds": 2, "coalesce": "0", "kernel_loop_dio": "1", "rows": [row],
              "scaling_1_to_2_queues": {"randread": {"kernel": 1.8, "per-tag loop": 2.4}}}
    md = io_modes.render(result, True).splitlines()
    assert "| randread qd64 b16 x1 | 2000 | 1000 (0.50x) | 1500 (0.75x) | 1.50x | 1200 | 1800 | 1.50x | 0.050, 0.045 | 22.5 |" in md
    assert md[-1] == "scaling from 1 to 2 queues (2 jobs) at qd64: randread: kernel 1.80x, per-tag loop 2.40x."
