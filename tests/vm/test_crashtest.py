"""`crashtest` on a ublk device: ext4 with barriers survives every crash state tried, and the
device is gone afterwards. (The host tests run the rest on FUSE devices, through the same
pipeline and log: nobarrier fails, a toy commit is caught, the printed command rebuilds the
failing state: tests/test_crashtest.py.)"""
import json
import os

from .conftest import cli

WORKLOAD = ("mkdir d; for i in $(seq 1 20); do head -c 20000 /dev/urandom > d/f$i; mkdir d/s$i; done; sync; "
            "for i in $(seq 1 20 2); do rm -r d/f$i d/s$i; mv d/f$((i+1)) d/g$i; done; sync")


def test_ext4_crash_states_on_a_ublk_device(scratch):
    r = cli("crashtest", "--workdir", scratch, "--size", "32M", "--states", "1", "--max-states", "24", "--json",
            "--", "sh", "-c", WORKLOAD, check=False, timeout=900)
    assert r.returncode == 0, r.stderr + r.stdout
    got = json.loads(r.stdout)
    assert got["failed"] == 0 and got["states"] == 24 and got["epochs"] >= 5, got
    assert not [n for n in os.listdir("/dev") if n.startswith("ublkc")], "crashtest left its device"
    assert os.listdir(scratch) == [], "crashtest left files behind"
