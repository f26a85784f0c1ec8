"""`crashtest` on a ublk device (the host tests run it on FUSE devices): ext4 with barriers
survives every crash state tried, ext4 mounted nobarrier does not, and a failing state's
`replay` command rebuilds an image that fails fsck the same way."""
import json
import os
import subprocess

from .conftest import cli

WORKLOAD = ("mkdir d; for i in $(seq 1 20); do head -c 20000 /dev/urandom > d/f$i; mkdir d/s$i; done; sync; "
            "for i in $(seq 1 20 2); do rm -r d/f$i d/s$i; mv d/f$((i+1)) d/g$i; done; sync")


def crashtest(scratch, *args):
    r = cli("crashtest", "--workdir", scratch, "--size", "32M", "--states", "1", "--json", *args,
            "--", "sh", "-c", WORKLOAD, check=False, timeout=900)
    assert r.returncode in (0, 1), r.stderr
    return r.returncode, json.loads(r.stdout)


def test_ext4_crash_states_on_a_ublk_device(scratch):
    rc, got = crashtest(scratch, "--max-states", "30")
    assert rc == 0 and got["failed"] == 0 and got["epochs"] >= 5, got
    assert not [n for n in os.listdir("/dev") if n.startswith("ublkc")], "crashtest left its device"

    rc, got = crashtest(scratch, "--mount-opts", "nobarrier", "--max-states", "20")
    assert rc == 1 and got["failed"] > 0, got
    f = got["first_failure"]
    argv = f["rebuild"].split()
    img = os.path.join(scratch, "rebuilt.img")
    cli(*argv[1:3], img, *argv[4:])
    # the rebuilt state fails as crashtest saw it fail: at mount, or in fsck after the mount
    mnt = os.path.join(scratch, "m")
    os.makedirs(mnt)
    mounted = subprocess.run(["mount", "-o", "loop,nobarrier", img, mnt], capture_output=True).returncode == 0
    if mounted:
        subprocess.run(["umount", mnt], check=True)
        assert subprocess.run(["fsck.ext4", "-fn", img], capture_output=True).returncode != 0, f
    else:
        assert f["why"].startswith("mount failed"), f
