"""Every optional kernel feature is detected at run time: where the running ublk_drv lacks
one, the verb that needs it says so in one line naming the feature, and `auto` choices fall
back to what the kernel has. On the newest kernel these cases are skipped (the features are
proven by their own tests); `scripts/test.sh` runs this file on Debian's stable kernel (6.12),
which offers far fewer feature bits, with the `basics` tests beside it."""
import json

import pytest

from .conftest import cli, pread_direct, pwrite_direct, pattern

pytestmark = pytest.mark.basics


def _features() -> int:
    from ublkshell.kernel.ctrl import Control
    with Control() as c:
        return c.features


def _lacks(bit_name: str) -> None:
    from ublkshell._native import lib
    if _features() & getattr(lib, bit_name):
        pytest.skip(f"this kernel offers {bit_name}; its own tests prove it")


def _one_line_error(p, *words):
    assert p.returncode != 0, p
    assert p.stdout == "", p.stdout
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ublkshell: "), p.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert "Traceback" not in p.stderr


def _info(dev_id) -> dict:
    return json.loads(cli("info", str(dev_id), "--json").stdout)


def test_batch_io_missing(devices):
    _lacks("UBLK_F_BATCH_IO")
    _one_line_error(cli("add", "-t", "null", "--size", "16M", "--io-mode", "batch", check=False), "UBLK_F_BATCH_IO")
    dev = devices.add("-t", "mem", "--size", "8M")
    assert _info(dev["id"])["list"]["io_mode"] == "per-tag"
    data = pattern(64 << 10, 1)
    pwrite_direct(dev["path"], data, 1 << 20)
    assert pread_direct(dev["path"], len(data), 1 << 20) == data


def test_zero_copy_missing(devices, backing):
    _lacks("UBLK_F_AUTO_BUF_REG")
    _one_line_error(cli("add", "-t", "mem", "--size", "8M", "--zero-copy", "on", check=False),
                    "UBLK_F_AUTO_BUF_REG")
    # auto would pick zero copy for a loop file outside RAM; here it copies, and IO works
    dev = devices.add("-t", "loop", "-f", backing.make("ext4", 16 << 20))
    assert _info(dev["id"])["list"]["zero_copy"] is False
    data = pattern(128 << 10, 2)
    pwrite_direct(dev["path"], data, 4 << 20)
    assert pread_direct(dev["path"], len(data), 4 << 20) == data


def test_resize_missing(devices):
    _lacks("UBLK_F_UPDATE_SIZE")
    dev = devices.add("-t", "mem", "--size", "8M")
    _one_line_error(cli("resize", str(dev["id"]), "+8M", check=False), "UBLK_F_UPDATE_SIZE")
    assert _info(dev["id"])["list"]["size"] == 8 << 20


def test_quiesce_and_upgrade_missing_but_recovery_works(devices):
    _lacks("UBLK_F_QUIESCE")
    dev = devices.add("-t", "mem", "--size", "8M", "--recovery")
    for verb in ("quiesce", "upgrade"):
        _one_line_error(cli(verb, str(dev["id"]), check=False), "UBLK_F_QUIESCE")
    data = pattern(32 << 10, 3)
    pwrite_direct(dev["path"], data, 0)
    # the recovery these older kernels do have still replaces a killed daemon
    cli("kill", str(dev["id"]))
    cli("recover", str(dev["id"]))
    assert pread_direct(dev["path"], len(data), 0) == data


def test_recovery_fail_mode_missing():
    _lacks("UBLK_F_USER_RECOVERY_FAIL_IO")
    _one_line_error(cli("add", "-t", "null", "--size", "16M", "--recovery=fail", check=False),
                    "user_recovery_fail_io")
