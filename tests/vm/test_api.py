"""The Python API and the pytest plugin's `ublk_device` fixture on the real driver."""
import errno
import os

from .conftest import pattern, pread_direct, pwrite_direct

KB = 1024


def _errno(fn, *a):
    try:
        fn(*a)
    except OSError as e:
        return e.errno
    return 0


def test_fixture_and_rule_methods(ublk_device):
    dev = ublk_device("mem", size="64M")
    assert os.path.exists(dev.path) and dev.info["target"] == "mem"
    ids = dev.fail(op="write", lba=(0, 7), errno="EIO")
    assert _errno(pwrite_direct, dev.path, pattern(4 * KB, 1), 0) == errno.EIO
    assert _errno(pwrite_direct, dev.path, pattern(4 * KB, 1), 4 * KB) == 0
    dev.badblocks(range(64, 72), 200)
    assert _errno(pread_direct, dev.path, 4 * KB, 64 * 512) == errno.EIO
    f = dev.faults()
    assert [r["text"] for r in f["rules"]] == ["fail op=write lba=0..7 errno=EIO", "badblocks 64..71",
                                              "badblocks 200"]
    assert f["rules"][0]["id"] == ids[0] and f["rules"][0]["hits"] == 1
    assert dev.clear(ids[0]) == 1 and dev.clear() == 2
    dev.delay(("1ms", "2ms"), op=["read"], p=1)
    assert pread_direct(dev.path, 4 * KB, 4 * KB) == pattern(4 * KB, 1)
    assert dev.faults()["rules"][0]["text"] == "delay 1ms..2ms op=read"  # p=1 is the default
    assert dev.seed(99) == 99
    assert dev.stats()["ops"]["write"]["errors"] == 1
    made = dev.id
    dev.delete()
    assert not os.path.exists(f"/dev/ublkc{made}")


def test_context_manager_deletes():
    import ublkshell

    with ublkshell.device("null", size="16M") as dev:
        assert os.path.exists(dev.path)
        dev.hang(op="flush", count=1)
    assert not os.path.exists(f"/dev/ublkc{dev.id}")


def test_kill_and_recover_keep_the_data(ublk_device):
    dev = ublk_device("mem", size="64M", recovery=True)
    data = pattern(64 * KB, 2)
    pwrite_direct(dev.path, data, 1 << 20)
    dev.fail(op="read", lba=(0, 7))
    assert dev.kill()["state"] == "QUIESCED"
    dev.recover()
    assert pread_direct(dev.path, 64 * KB, 1 << 20) == data
    # the rules live in the device's statistics, which the new daemon keeps
    assert _errno(pread_direct, dev.path, 4 * KB, 0) == errno.EIO
    assert dev.faults()["rules"][0]["hits"] == 1
