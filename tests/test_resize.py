"""`resize`'s checks that need no driver: the size a filesystem covers, read the way the
refusal to shrink reads it, from real mkfs output; and SIZE's forms."""
import subprocess

import pytest

from ublkshell.devices.resize import _new_size, ext_size, filesystem_on
from ublkshell.errors import UsageError


def image(tmp_path, size, *mkfs):
    img = tmp_path / "fs.img"
    with open(img, "wb") as f:
        f.truncate(size)
    if mkfs:
        subprocess.run([*mkfs, str(img)], check=True, capture_output=True)
    return str(img)


@pytest.mark.parametrize("opts", [["-O", "^64bit"], ["-O", "64bit"], ["-b", "1024"], ["-t", "ext2"]])
def test_ext_size_is_what_mkfs_made(tmp_path, opts):
    img = image(tmp_path, 96 << 20, "mkfs.ext4", "-q", "-F", *opts)
    assert filesystem_on(img) == ("ext2/3/4", 96 << 20)
    # a filesystem made smaller than its device covers only its own blocks
    img2 = image(tmp_path, 96 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", *opts, img2, "40M"], check=True, capture_output=True)
    assert filesystem_on(img2) == ("ext2/3/4", 40 << 20)


def test_other_signatures_are_named_and_unsized(tmp_path):
    assert filesystem_on(image(tmp_path, 16 << 20)) == (None, None)
    # xfs has no size ublkshell reads: named, refused as unknown (mkfs.xfs wants 300M at least)
    assert filesystem_on(image(tmp_path, 320 << 20, "mkfs.xfs", "-q", "-f")) == ("xfs", None)
    # an MBR with one partition, as fdisk writes it
    img = image(tmp_path, 16 << 20)
    mbr = bytearray(512)
    mbr[446:462] = bytes([0, 0, 2, 0, 0x83, 0, 0, 0]) + (2048).to_bytes(4, "little") + (30000).to_bytes(4, "little")
    mbr[510:512] = b"\x55\xaa"
    with open(img, "r+b") as f:
        f.write(mbr)
    assert filesystem_on(img) == ("a dos partition table", None)


def test_a_super_block_that_lies_is_not_one():
    sb = bytearray(1024)
    sb[56:58] = (0xEF53).to_bytes(2, "little")
    sb[24:28] = (40).to_bytes(4, "little")  # 1 KiB << 40: no filesystem has such blocks
    assert ext_size(bytes(sb)) is None and ext_size(b"short") is None


def test_sizes():
    assert _new_size("128M", 64 << 20, 512) == 128 << 20
    assert _new_size("+64M", 64 << 20, 4096) == 128 << 20
    for text, words in (("1000", "4096-byte blocks"), ("0", "greater than zero"), ("x", "not a size"),
                        ("+1E", "larger than"), ("-1G", "not a size")):
        with pytest.raises(UsageError, match=words):
            _new_size(text, 64 << 20, 4096)
