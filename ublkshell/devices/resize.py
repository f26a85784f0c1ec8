"""`resize ID SIZE`: change a live device's size (UBLK_U_CMD_UPDATE_SIZE, Linux 6.16+).

The kernel's size moves last when growing and first when shrinking, so the backing store
always covers the device: a mem file grows before the kernel offers the new sectors (a
zero-copy read never comes back short) and gives back its memory only after the kernel
stopped asking for them. A loop file is grown (sparse) but never truncated: what lies past
a smaller device stays in the user's file. No daemon takes part: its targets bound nothing
by the device's size.

Shrinking below a filesystem is refused unless forced: ext2/3/4's own size is read from
its super block; any other signature blkid finds (xfs, btrfs, a partition table, ...) is
refused as a size we cannot check."""
import errno
import os
import stat
import struct
import subprocess

from . import ids as devids, registry
from .. import files
from ..errors import UblkError, UsageError
from ..kernel.ctrl import Control, CtrlError
from ..units import human, parse_size

MAX_SIZE = 1 << 60
EXT_MAGIC = 0xEF53
EXT_INCOMPAT_64BIT = 0x80


def ext_size(sb: bytes) -> int | None:
    """Bytes an ext2/3/4 filesystem covers, from its super block (1024 bytes read at 1024)."""
    if len(sb) < 1024 or struct.unpack_from("<H", sb, 56)[0] != EXT_MAGIC:
        return None
    blocks = struct.unpack_from("<I", sb, 4)[0]
    log_bs = struct.unpack_from("<I", sb, 24)[0]
    if log_bs > 6:  # 64 KiB blocks at most: anything else is not a super block
        return None
    if struct.unpack_from("<I", sb, 96)[0] & EXT_INCOMPAT_64BIT:
        blocks |= struct.unpack_from("<I", sb, 0x150)[0] << 32
    return blocks * (1024 << log_bs)


def filesystem_on(node: str) -> tuple[str | None, int | None]:
    """(what the device holds, the bytes it covers or None if unknown); (None, None): nothing."""
    try:
        fd = os.open(node, os.O_RDONLY | os.O_CLOEXEC)
        try:
            covered = ext_size(os.pread(fd, 1024, 1024))
        finally:
            os.close(fd)
    except OSError as e:
        raise UblkError(f"resize: cannot read {node}: {e.strerror}") from None
    if covered is not None:
        return "ext2/3/4", covered
    # -p: the device itself, not blkid's cache; argv from a kernel device number only
    try:
        p = subprocess.run(["blkid", "-p", "-o", "export", node], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UblkError(f"resize: cannot check what {node} holds (blkid: {e}): --force shrinks it anyway") from None
    found = dict(line.split("=", 1) for line in p.stdout.splitlines() if "=" in line)
    what = found.get("TYPE") or (f"a {found['PTTYPE']} partition table" if "PTTYPE" in found else None)
    return what, None


def _new_size(text: str, old: int, block_size: int) -> int:
    text = str(text).strip()
    grow = text.startswith("+")
    new = parse_size(text[1:] if grow else text, "SIZE", hi=MAX_SIZE) + (old if grow else 0)
    if new > MAX_SIZE:
        raise UsageError(f"resize: {text} makes the device larger than {human(MAX_SIZE)}")
    if new % block_size:
        raise UsageError(f"resize: {human(new)} ({new} bytes) is not a whole number of "
                         f"{block_size}-byte blocks")
    return new


def _grow_file(fd: int, size: int, what: str) -> None:
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        have = os.lseek(fd, 0, os.SEEK_END)
        if size > have:
            raise UblkError(f"resize: {what} is a block device of {human(have)}: the device cannot "
                            f"be larger")
        return
    if st.st_size < size:
        try:
            os.ftruncate(fd, size)
        except OSError as e:
            raise UblkError(f"resize: cannot grow {what} to {human(size)}: {e.strerror}") from None


def _backing_fd(entry: dict) -> tuple[int, str] | None:
    """The backing file the daemon serves, opened again and proven the same file."""
    if entry.get("mem_path"):
        path = entry["mem_path"]
        fd = files.open_nofollow(path, os.O_RDWR)
        return fd, path
    path = entry.get("spec", {}).get("file")
    if not path:
        return None  # null, pattern: nothing holds the data
    want = entry.get("file_id")
    if not want:
        raise UblkError(f"resize: device {devids.name(entry['id'])}'s daemon did not record which "
                        "file it serves (a daemon from before resize existed): `recover` or re-add it")
    # looked at before it is opened: a path a user redirected never gets opened for writing
    try:
        probe = os.open(path, os.O_PATH | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as e:
        raise UblkError(f"resize: {path}: {e.strerror}") from None
    try:
        st = os.fstat(probe)
        if [st.st_dev, st.st_ino] != list(want):
            raise UblkError(f"resize: {path} is no longer the file device {devids.name(entry['id'])} serves")
        fd = os.open(f"/proc/self/fd/{probe}", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise UblkError(f"resize: {path}: {e.strerror}") from None
    finally:
        os.close(probe)
    return fd, path


def resize(dev_id: int, size_text: str, force: bool = False) -> dict:
    name = devids.name(dev_id)
    if devids.is_fuse(dev_id):
        raise UblkError(f"resize: {name} is a FUSE-transport device, whose size is fixed at `add`")
    with Control() as ctrl:
        from .._native import lib

        if not ctrl.features & lib.UBLK_F_UPDATE_SIZE:
            raise UblkError("resize: this kernel's ublk_drv cannot resize a live device "
                            "(no UBLK_F_UPDATE_SIZE, Linux 6.16+)")
        try:
            info = ctrl.get_dev_info(dev_id)
            params = ctrl.get_params(dev_id)
        except CtrlError as e:
            if e.errno == errno.ENODEV:
                raise UblkError(f"device {name} does not exist") from None
            raise
        if info.flags & lib.UBLK_F_ZONED:
            raise UblkError(f"resize: device {name} is zoned, and its zones are fixed at `add`")
        if info.state != lib.UBLK_S_DEV_LIVE:
            raise UblkError(f"resize: device {name} is not live (its daemon is gone?): recover it first")
        entry = registry.read(dev_id)
        if not entry:
            raise UblkError(f"device {name} is not served by ublkshell")
        old = int(params.basic.dev_sectors) << 9
        block_size = 1 << params.basic.logical_bs_shift
        new = _new_size(size_text, old, block_size)
        node = f"/dev/ublkb{dev_id}"
        held = None
        if new < old and not force:
            what, covered = filesystem_on(node)
            if what and covered is None:
                raise UsageError(f"resize: {node} holds {what}, whose size ublkshell cannot check: "
                                 "shrink it first, then resize --force")
            if covered is not None and covered > new:
                raise UsageError(f"resize: the {what} filesystem on {node} covers {human(covered)}; "
                                 f"{human(new)} would cut it (shrink the filesystem first, or --force)")
            held = what
        backing = _backing_fd(entry) if new != old else None
        grown_from = None
        try:
            if backing and new > old:
                grown_from = os.fstat(backing[0]).st_size
                _grow_file(backing[0], new, backing[1])
            try:
                ctrl.update_size(dev_id, new >> 9)
            except BaseException:
                if grown_from is not None and os.fstat(backing[0]).st_size > grown_from:
                    os.ftruncate(backing[0], grown_from)  # the kernel said no: the file as it was
                raise
            if backing and new < old and entry.get("mem_path"):
                # the memory back; a write already past the new end may still grow it a little
                os.ftruncate(backing[0], new)
        except OSError as e:
            raise UblkError(f"resize: {backing[1] if backing else node}: {e.strerror}") from None
        finally:
            if backing:
                os.close(backing[0])
    entry["size"] = new
    entry.setdefault("spec", {})["size"] = new
    registry.write(dev_id, entry)
    return {"device": name, "block": node, "old_size": old, "size": new, "filesystem": held}


def render_resize(r: dict) -> str:
    if r["size"] == r["old_size"]:
        return f"dev {r['device']}: already {human(r['size'])}"
    grown = r["size"] > r["old_size"]
    tail = ""
    if grown:
        tail = " (a filesystem on it grows with resize2fs, xfs_growfs, btrfs filesystem resize)"
    return f"dev {r['device']}: {human(r['old_size'])} -> {human(r['size'])} ({r['block']}){tail}"
