"""Option parsing and error messages: bad input gets one line, never a traceback."""
import os
import subprocess
import sys

import pytest

from ublkshell.errors import UsageError
from ublkshell.units import human, parse_size
from ublkshell.devices.targets import build_spec


def cli(*args, env=None):
    e = {**os.environ, "UBLKSHELL_STATE_DIR": "/tmp/ublkshell-test-state", **(env or {})}
    return subprocess.run([sys.executable, "-m", "ublkshell", *args], capture_output=True,
                          text=True, timeout=60, env=e)


@pytest.mark.parametrize("text,value", [
    ("512", 512), ("4k", 4096), ("4K", 4096), ("64M", 64 << 20), ("1G", 1 << 30),
    ("1.5G", 3 << 29), ("100GiB", 100 << 30), ("2t", 2 << 40), ("8kb", 8192),
])
def test_sizes(text, value):
    assert parse_size(text, "--size") == value


@pytest.mark.parametrize("text", ["", "G", "1X", "-5", "0", "1.2.3G", "abc"])
def test_bad_sizes_name_the_option(text):
    with pytest.raises(UsageError, match="^--size: "):
        parse_size(text, "--size")


def test_human():
    assert human(1 << 30) == "1G" and human(256 << 20) == "256M" and human(1536 << 20) == "1.5G"
    assert human(100) == "100B"


@pytest.mark.parametrize("args,message", [
    (["add", "-t", "bogus", "--size", "1G"], "ublkshell: -t/--type: unknown target 'bogus' (choose from null, mem, loop, pattern)"),
    (["add", "-t", "mem"], "ublkshell: --size is required for the mem target (e.g. --size 1G)"),
    (["add", "-t", "mem", "--size", "1Q"], "ublkshell: --size: '1Q' is not a size (try 512, 4k, 64M, 1G)"),
    (["add", "-t", "mem", "--size", "1G", "-d", "4097"], "ublkshell: -d/--depth: 4097 is out of range (1..4096)"),
    (["add", "-t", "mem", "--size", "1G", "-d", "0"], "ublkshell: -d/--depth: 0 is out of range (1..4096)"),
    (["add", "-t", "mem", "--size", "1G", "-q", "0"], "ublkshell: -q/--queues: 0 is out of range (1..64)"),
    (["add", "-t", "mem", "--size", "1000"], "ublkshell: --size: 1000 is not a multiple of the block size (512)"),
    (["add", "-t", "mem", "--size", "1G", "--block-size", "3k"], "ublkshell: --block-size: 3k must be 512, 1k, 2k or 4k"),
    (["add", "-t", "mem", "--size", "1G", "--max-io", "5000"], "ublkshell: --max-io: 5000 must be a multiple of 4k between 4k and 32M"),
    (["add", "-t", "loop"], "ublkshell: the loop target needs a backing file: -f/--file PATH"),
    (["add", "-t", "loop", "-f", "/nonexistent/disk.img"], "ublkshell: -f/--file: /nonexistent/disk.img: no such file"),
    (["add", "-t", "loop", "-f", "/"], "ublkshell: -f/--file: /: not a regular file or block device"),
    (["add", "-t", "null", "--size", "1G", "-f", "/etc/hostname"], "ublkshell: -f/--file is only for the loop target, not null"),
    (["add", "-t", "mem", "--size", "1G", "-d", "x"], "ublkshell: argument -d/--depth: invalid int value: 'x'"),
    (["del"], "ublkshell: del: which device? give an id (see `ublkshell list`) or -a for all"),
    (["del", "-a", "3"], "ublkshell: del: give device ids or -a, not both"),
    (["frobnicate"], None),
    # daemon death and recovery
    (["add", "-t", "mem", "--size", "1G", "--recovery=bogus"],
     "ublkshell: --recovery: unknown mode 'bogus' (choose from requeue, reissue, fail)"),
    (["kill"], "ublkshell: the following arguments are required: ID"),
    (["recover", "x"], "ublkshell: argument ID: 'x' is not a device id (a number like 0, or fuseN for a FUSE device)"),
    (["kill", "0", "1"], "ublkshell: unrecognized arguments: 1"),
    (["add", "--transport", "fuse", "-t", "mem", "--size", "1G", "--recovery"],
     "ublkshell: --recovery is ublk's: its kernel driver holds IO while no daemon serves; a FUSE "
     "connection ends with its daemon, so there is nothing to recover"),
    # faults and power cuts
    (["add", "-t", "null", "--size", "1G", "--powercut"],
     "ublkshell: --powercut needs a target that stores data (mem, loop), not null"),
    (["add", "--transport", "fuse", "-t", "pattern", "--size", "1G", "--powercut"],
     "ublkshell: --powercut needs a target that stores data (mem, loop), not pattern"),
    (["powercut", "0", "--keep", "2"], "ublkshell: --keep: 2 is outside 0..1"),
    (["powercut", "0", "--partial", "--keep", "0.3"], "ublkshell: powercut: --partial or --keep P, not both"),
    (["fail", "0", "op=wrte"],
     "ublkshell: fail: column 8: unknown op 'wrte' (read, write, flush, discard, write_zeroes, zone_open, "
     "zone_close, zone_finish, zone_append, zone_reset_all, zone_reset, report_zones)"),
    (["delay", "12"], "ublkshell: delay: column 9: delay needs a duration: delay 5ms, or delay 1ms..50ms"),
    (["clear", "0", "x"], "ublkshell: argument RULE: invalid int value: 'x'"),
])
def test_bad_input_is_one_line_with_exit_2(args, message):
    p = cli(*args)
    assert p.returncode == 2, (p.returncode, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert "Traceback" not in p.stderr
    if message:
        assert lines[0] == message
    else:
        assert lines[0].startswith("ublkshell: ")


def test_empty_loop_file_needs_size(tmp_path):
    img = tmp_path / "empty.img"
    img.write_bytes(b"")
    p = cli("add", "-t", "loop", "-f", str(img))
    assert p.returncode == 2
    assert p.stderr.strip() == f"ublkshell: -f/--file: {img} is empty: give --size to serve it anyway"


@pytest.mark.skipif(os.path.exists("/dev/ublk-control"), reason="this kernel has ublk_drv")
def test_list_without_the_driver_is_an_empty_list(tmp_path):
    # nothing to list is not an error: scripts that list before adding must not fail
    env = {"UBLKSHELL_STATE_DIR": str(tmp_path / "state")}
    p = cli("list", env=env)
    assert (p.returncode, p.stdout, p.stderr) == (0, "no ublk devices\n", "")
    p = cli("list", "--json", env=env)
    assert (p.returncode, p.stdout, p.stderr) == (0, "[]\n", "")


@pytest.mark.skipif(os.path.exists("/dev/ublk-control"), reason="this kernel has ublk_drv")
@pytest.mark.parametrize("args", [["features"], ["del", "0"], ["add", "-t", "mem", "--size", "1G"],
                                  ["kill", "0"], ["recover", "0"],
                                  ["add", "-t", "mem", "--size", "1G", "--recovery=fail"]])
def test_missing_driver_says_how_to_get_it(args):
    p = cli(*args)
    assert p.returncode == 1
    assert p.stderr.strip() == (
        "ublkshell: the running kernel has no ublk_drv (/dev/ublk-control is missing): load it "
        "with `modprobe ublk_drv`, run inside the bundled VM: `ublkshell vm -- ublkshell ...`, "
        "or serve the device through FUSE instead: `add --transport fuse`")


def test_metrics_with_nothing_to_count_still_parse(tmp_path):
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse
    from prometheus_client.parser import text_string_to_metric_families as prom_parse

    env = {"UBLKSHELL_STATE_DIR": str(tmp_path / "state"), "UBLKSHELL_DATA_DIR": str(tmp_path / "data")}
    p = cli("metrics", env=env)
    assert p.returncode == 0 and p.stderr == ""
    assert "ublkshell_ios_total" in {f.name + "_total" for f in prom_parse(p.stdout)}
    p = cli("metrics", "--format", "openmetrics", env=env)
    assert p.stdout.endswith("# EOF\n") and "ublkshell_ios" in {f.name for f in om_parse(p.stdout)}
    p = cli("metrics", "--format", "xml", env=env)
    assert (p.returncode, p.stderr) == (2, "ublkshell: metrics: unknown format 'xml' (choose from prometheus, openmetrics)\n")


def test_a_reader_that_leaves_early_is_no_error(tmp_path):
    # buffered as for any user (an unbuffered stdout would meet the pipe inside the verb instead)
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"},
           "UBLKSHELL_STATE_DIR": str(tmp_path / "state"), "UBLKSHELL_DATA_DIR": str(tmp_path / "d")}
    # `true` is gone before the interpreter starts: the write meets a closed pipe
    p = subprocess.run(f"{sys.executable} -m ublkshell metrics | true; echo ${{PIPESTATUS[0]}}", shell=True,
                       executable="/bin/bash", capture_output=True, text=True, timeout=60, env=env)
    assert (p.stdout, p.stderr) == ("141\n", "")
    p = subprocess.run(f"{sys.executable} -m ublkshell metrics | head -c 10", shell=True, capture_output=True,
                       text=True, timeout=60, env=env)
    assert (p.stdout, p.stderr) == ("# HELP ubl", "")


def test_version():
    import ublkshell
    from ublkshell.observe.schema import SCHEMA_VERSION

    for flag in ("--version", "-V"):
        p = cli(flag)
        assert (p.returncode, p.stdout, p.stderr) == (
            0, f"ublkshell {ublkshell.__version__} (JSON schema {SCHEMA_VERSION})\n", "")


def test_help_teaches():
    p = cli("--help")
    assert p.returncode == 0
    for word in ("add -t loop -f disk.img", "ublkshell vm --", "del -a", "features"):
        assert word in p.stdout
    p = cli("add", "--help")
    assert p.returncode == 0 and "--depth" in p.stdout and "null" in p.stdout


def test_spec_from_good_options(tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(b"\0" * 4096)
    spec = build_spec("loop", file=str(img), queues=2, depth=64)
    assert spec["file"] == str(img) and spec["queues"] == 2 and spec["depth"] == 64
    assert spec["block_size"] == 512 and spec["max_io"] == 512 << 10
    assert build_spec("mem", size="1G")["size"] == 1 << 30


def test_fault_verbs_on_a_device_without_statistics(tmp_path):
    env = dict(os.environ, UBLKSHELL_DATA_DIR=str(tmp_path))
    for args, message in [
        (["fail", "5", "op=read"], f"ublkshell: device 5 is not served by ublkshell (no {tmp_path}/ublkb5.stats)"),
        (["faults", "5"], f"ublkshell: device 5 is not served by ublkshell (no {tmp_path}/ublkb5.stats)"),
    ]:
        p = cli(*args, env=env)
        assert p.returncode == 1 and p.stderr.strip() == message, (args, p.stderr)
    # a bad seed is refused before any device is looked at
    p = cli("seed", "5", "-1", env=env)
    assert p.returncode == 2 and p.stderr.strip() == "ublkshell: seed: -1 is out of range (0..18446744073709551615)"
