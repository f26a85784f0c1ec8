"""pytest plugin (registered as the `ublkshell` pytest11 entry point): the
`ublk_device` fixture, a factory of devices deleted when the test ends.

    def test_fs_survives_write_errors(ublk_device):
        dev = ublk_device("mem", size="256M")
        dev.fail(op="write", lba=(2048, 4095), p=0.5)
        ...                      # mkfs, mount, run the workload on dev.path

Without ublk_drv (no /dev/ublk-control) the test is skipped with the reason.
"""
import os

import pytest


@pytest.fixture
def ublk_device():
    from .api import device

    made = []

    def make(target: str = "mem", **kw):
        if not os.path.exists("/dev/ublk-control"):
            pytest.skip("ublk_drv is not loaded (/dev/ublk-control missing): `modprobe ublk_drv`, "
                        "or run the tests in the bundled VM (`ublkshell vm -- pytest ...`)")
        dev = device(target, **kw)
        made.append(dev)
        return dev

    yield make
    for dev in made:
        if os.path.exists(f"/dev/ublkc{dev.id}"):
            dev.delete()
