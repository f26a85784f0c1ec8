"""Run one command as root inside a throwaway VM whose kernel has ublk_drv.

Hosts often lack ublk_drv (and KVM may refuse ordinary guests), so this boots Debian's
newest packaged kernel under QEMU software emulation with the host's whole filesystem
shared in read-write over 9p: the guest runs the host's python, venvs and checkouts at
the same paths.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import lzma
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ..errors import UblkError
from . import debfetch
from .debfetch import FetchError, progress

DEFAULT_MEM = "3G"
DEFAULT_CPUS = 2
DEFAULT_TIMEOUT = 1800

# command on the host -> Debian package providing it
HOST_TOOLS = {
    "qemu-system-x86_64": "qemu-system-x86",
    "busybox": "busybox-static",
    "cpio": "cpio",
    "xz": "xz-utils",
    "depmod": "kmod",
}
BOOT_ATTEMPTS = 3
INITRD_MODULES = ("netfs", "9pnet", "9pnet_virtio", "9p")
PASS_ENV_PREFIXES = ("UBLKSHELL_",)
PASS_ENV_NAMES = ("PYTEST_ADDOPTS",)

_ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1bc")
_NOISE = (b"reboot: Power down", b"sysrq: Power Off", b"SeaBIOS (version")


class HarnessError(UblkError):
    """A one-line, user-facing reason the VM could not be run."""


def _which(cmd: str) -> str | None:
    # depmod/modprobe live in /usr/sbin, often missing from a non-root PATH.
    return shutil.which(cmd) or shutil.which(cmd, path="/usr/sbin:/sbin")


def ensure_host_tools() -> None:
    missing = sorted({pkg for cmd, pkg in HOST_TOOLS.items() if not _which(cmd)})
    if not missing:
        return
    if os.geteuid() != 0:
        raise HarnessError(
            f"missing host packages: {' '.join(missing)} "
            f"(run as root, or: sudo apt-get install {' '.join(missing)})"
        )
    progress(f"installing host packages: {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "-qq", "update"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]):
        p = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if p.returncode != 0:
            last = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
            raise HarnessError(f"{' '.join(cmd[:2])} failed: {last}")


def _init_script() -> bytes:
    return (Path(__file__).with_name("init.sh")).read_bytes()


def _find_module(moddir: Path, name: str) -> bytes:
    for suffix, opener in ((".ko", None), (".ko.xz", lzma.open), (".ko.zst", None)):
        hits = sorted(moddir.rglob(name + suffix))
        if not hits:
            continue
        if suffix == ".ko":
            return hits[0].read_bytes()
        if opener is not None:
            with opener(hits[0]) as f:
                return f.read()
        # Python's stdlib cannot read zstd before 3.14.
        return subprocess.run(["zstd", "-dc", str(hits[0])], check=True, capture_output=True).stdout
    raise HarnessError(f"kernel module {name} not found under {moddir}")


def build_initrd(ver: str, root: Path) -> Path:
    """Build (once per kernel version and init script) the initramfs holding busybox and 9p."""
    init = _init_script()
    key = hashlib.sha256(init).hexdigest()[:12]
    out = debfetch.cache_root() / "initrd" / ver / f"initrd-{key}.gz"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    progress(f"building initrd for {ver}")
    moddir = root / "usr/lib/modules" / ver
    # Debian's module packages leave modules.dep to postinst; modprobe in the guest needs it.
    if not (moddir / "modules.dep").is_file():
        lib = root / "lib"
        if not lib.exists():
            lib.symlink_to("usr/lib")
        p = subprocess.run([_which("depmod") or "depmod", "-b", str(root), ver],
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise HarnessError(f"depmod failed: {p.stderr.strip()}")
    busybox = _which("busybox")
    if not busybox:
        raise HarnessError("busybox not found (apt-get install busybox-static)")
    with tempfile.TemporaryDirectory(prefix="ublkshell-initrd-") as tmp:
        t = Path(tmp)
        for d in ("bin", "mods", "proc", "sys", "dev", "newroot"):
            (t / d).mkdir()
        shutil.copy2(busybox, t / "bin/busybox")
        for m in INITRD_MODULES:
            (t / "mods" / f"{m}.ko").write_bytes(_find_module(moddir, m))
        (t / "init").write_bytes(init)
        (t / "init").chmod(0o755)
        names = sorted(str(p.relative_to(t)) for p in t.rglob("*"))
        p = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=t,
                           input="\n".join([".", *names]).encode() + b"\n",
                           capture_output=True)
        if p.returncode != 0:
            raise HarnessError(f"cpio failed: {p.stderr.decode(errors='replace').strip()}")
        partial = out.with_suffix(".partial")
        with gzip.open(partial, "wb", compresslevel=1) as f:
            f.write(p.stdout)
        partial.rename(out)
    return out


def _job_script(cmd: list[str], modroot: Path) -> str:
    lines = [
        ': > "${0%/*}/started"',
        "modprobe -a ublk_drv loop || echo 'vm: modprobe failed' >&2",
        f"export UBLKSHELL_IN_VM=1 UBLKSHELL_VM_MODROOT={shlex.quote(str(modroot))}",
        # the host's /tmp arrives over 9p, where unlinked temporary files (pytest's capture
        # files, for one) can vanish under their users: keep scratch on the guest's tmpfs
        "export TMPDIR=/dev/shm",
    ]
    for k, v in sorted(os.environ.items()):
        if (k.startswith(PASS_ENV_PREFIXES) or k in PASS_ENV_NAMES) and re.fullmatch(r"\w+", k):
            if k not in ("UBLKSHELL_IN_VM", "UBLKSHELL_VM_MODROOT"):
                lines.append(f"export {k}={shlex.quote(v)}")
    lines += [
        f"export PATH={shlex.quote(os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin'))}"
        f" HOME={shlex.quote(str(Path.home()))}",
        f"cd {shlex.quote(os.getcwd())} || {{ echo 'vm: cannot cd to the host cwd in the guest' >&2; exit 97; }}",
        shlex.join(cmd),
    ]
    return "\n".join(lines) + "\n"


def _clean(line: bytes) -> bytes:
    # Progress output (pytest's "collecting", fio) redraws with CR: keep what a terminal
    # would finally show rather than every redraw glued together.
    parts = [p for p in line.split(b"\r") if p.strip()]
    line = _ANSI.sub(b"", parts[-1] if parts else b"")
    # SeaBIOS prints this without a newline before the kernel's first line.
    return re.sub(rb"^.*Booting from ROM\.*", b"", line)


def run(cmd: list[str], mem: str = DEFAULT_MEM, cpus: int = DEFAULT_CPUS,
        timeout: float = DEFAULT_TIMEOUT, kernel: str = "newest") -> int:
    """Run cmd as root in the VM; stream its output to stdout; return its exit status.

    Raises FetchError/HarnessError for setup problems; boot failures and timeouts are
    reported on stderr and returned as non-zero statuses (124 on timeout).
    """
    if not cmd:
        raise HarnessError("no command given")
    ensure_host_tools()
    ver, root = debfetch.fetch_kernel(kernel=kernel)
    progress(f"kernel {ver}")
    initrd = build_initrd(ver, root)
    vmlinuz = root / "boot" / f"vmlinuz-{ver}"
    if not vmlinuz.is_file():
        vmlinuz = root / "usr/lib/modules" / ver / "vmlinuz"
    if not vmlinuz.is_file():
        raise HarnessError(f"no vmlinuz for {ver} in {root}")

    job = Path(tempfile.mkdtemp(prefix="ublkshell-vm-", dir="/tmp"))
    try:
        # The guest reads and writes the job dir through 9p as root; make it reachable.
        job.chmod(0o755)
        (job / "cmd").write_text(_job_script(cmd, root))
        qemu = [
            "qemu-system-x86_64", "-accel", "tcg,thread=multi", "-cpu", "max",
            "-m", str(mem), "-smp", str(cpus),
            "-nographic", "-no-reboot", "-nic", "none",
            "-kernel", str(vmlinuz), "-initrd", str(initrd),
            "-append", f"console=ttyS0 quiet loglevel=3 panic=-1 vmjob={job} vmmods={root}",
            "-virtfs", "local,path=/,mount_tag=host,security_model=none,id=host,multidevs=remap",
        ]
        deadline = time.monotonic() + timeout
        for attempt in range(1, BOOT_ATTEMPTS + 1):
            for name in ("rc", "started"):
                (job / name).unlink(missing_ok=True)
            rc = _boot(qemu, job, deadline - time.monotonic(), timeout)
            if rc is not None:
                return rc
            if (job / "started").exists() or attempt == BOOT_ATTEMPTS:
                return 125
            # Multi-threaded TCG occasionally oopses while the kernel live-patches its
            # own text early in boot (int3 from text_poke_bp); nothing has run yet, so retry.
            progress(f"the guest died before COMMAND started; booting again "
                     f"(attempt {attempt + 1} of {BOOT_ATTEMPTS})")
        return 125
    finally:
        shutil.rmtree(job, ignore_errors=True)


def _boot(qemu: list[str], job: Path, budget: float, timeout: float) -> int | None:
    """Boot once; the command's status, 124 on timeout, None if the guest reported none."""
    started = time.monotonic()
    proc = subprocess.Popen(qemu, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        proc.kill()

    timer = threading.Timer(max(budget, 0.0), kill)
    timer.daemon = True
    timer.start()
    tail: list[str] = []
    out = sys.stdout.buffer if hasattr(sys.stdout, "buffer") else None
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = _clean(raw.rstrip(b"\n")).rstrip()
            if not line.strip() or any(n in line for n in _NOISE):
                continue
            if out is not None:
                out.write(line + b"\n")
                out.flush()
            else:
                print(line.decode(errors="replace"), flush=True)
            tail = (tail + [line.decode(errors="replace")])[-5:]
        proc.wait()
    except KeyboardInterrupt:
        proc.kill()
        proc.wait()
        print("vm: interrupted", file=sys.stderr)
        return 130
    finally:
        timer.cancel()
    elapsed = time.monotonic() - started
    try:
        rc_text = (job / "rc").read_text().strip()
        return int(rc_text)
    except (OSError, ValueError):
        pass
    if timed_out.is_set():
        print(f"vm: the guest did not report an exit status (timeout after {timeout:g} s)",
              file=sys.stderr)
        return 124
    why = f"qemu exited with {proc.returncode}" if proc.returncode else "boot failure"
    print(f"vm: the guest did not report an exit status ({why} after {elapsed:.0f} s)",
          file=sys.stderr)
    return None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ublkshell vm",
        description=(
            "Boot Debian's newest packaged kernel (ublk_drv and loop loaded) under QEMU software "
            "emulation, with the host's whole filesystem shared in read-write over 9p, and run "
            "COMMAND there as root in the same cwd with the same PATH and HOME (UBLKSHELL_* and "
            "PYTEST_ADDOPTS are passed in too). The guest's console output is streamed to stdout; "
            "the exit status is COMMAND's. The first run downloads the kernel from "
            "trixie-backports (--kernel stable: trixie's, 6.12, with far fewer ublk features) "
            "through the host's Debian mirror and builds an initrd (cached "
            "under $UBLKSHELL_CACHE or ~/.cache/ublkshell). In the guest, write scratch files "
            "under /dev/shm (guest tmpfs), never over host state."
        ),
        usage="%(prog)s [--kernel newest|stable] [--mem 3G] [--cpus 2] [--timeout SECONDS] "
              "-- COMMAND...",
    )
    p.add_argument("--kernel", choices=sorted(debfetch.KERNELS), default="newest",
                   help="newest: trixie-backports' kernel (every ublk feature); stable: "
                        "trixie's (6.12), to prove the fallbacks (default %(default)s)")
    p.add_argument("--mem", default=DEFAULT_MEM, help="guest memory (default %(default)s)")
    p.add_argument("--cpus", type=int, default=DEFAULT_CPUS, help="guest CPUs (default %(default)s)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help="kill the VM after this many seconds; exit 124 (default %(default)s)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="command to run in the guest")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if "--" in argv:
        i = argv.index("--")
        args = parser.parse_args(argv[:i])
        if args.command:
            parser.error(f"unexpected arguments before --: {' '.join(args.command)}")
        args.command = argv[i + 1:]
    else:
        args = parser.parse_args(argv)
    if not args.command:
        parser.error("no COMMAND given (put it after --)")
    if args.cpus < 1 or args.timeout <= 0:
        parser.error("--cpus and --timeout must be positive")
    try:
        return run(args.command, mem=args.mem, cpus=args.cpus, timeout=args.timeout,
                   kernel=args.kernel)
    except (FetchError, HarnessError) as e:
        print(f"vm: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("vm: interrupted", file=sys.stderr)
        return 130
