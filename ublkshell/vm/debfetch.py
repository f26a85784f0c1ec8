"""Fetch Debian packages from trixie-backports (or trixie) without touching the host's apt state.

The host may run an older Debian whose kernel and headers lack ublk features, so the
VM kernel and the uapi header come from the newest packaged suite, through the mirror
the machine already uses, with a private apt state dir under the cache root. The stable
suite's kernel (6.12, far fewer ublk features) is there to prove the fallback paths.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import UblkError

SUITE = "trixie-backports"
# --kernel NAME -> the suite whose linux-image-amd64 it boots
KERNELS = {"newest": SUITE, "stable": "trixie"}
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
_SOURCES_DEB822 = Path("/etc/apt/sources.list.d/debian.sources")
_SOURCES_LIST = Path("/etc/apt/sources.list")


class FetchError(UblkError):
    """A one-line, user-facing reason why a package could not be fetched."""


def cache_root() -> Path:
    env = os.environ.get("UBLKSHELL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ublkshell"


def progress(msg: str) -> None:
    print(f"vm: {msg}", file=sys.stderr, flush=True)


def _mirror() -> str:
    override = os.environ.get("UBLKSHELL_DEBIAN_MIRROR")
    if override:
        return override
    # The security archive does not carry backports, so skip stanzas that only serve it.
    if _SOURCES_DEB822.is_file():
        for stanza in re.split(r"\n\s*\n", _SOURCES_DEB822.read_text()):
            fields = {}
            for line in stanza.splitlines():
                m = re.match(r"^([A-Za-z-]+):\s*(.*)$", line)
                if m:
                    fields[m.group(1).lower()] = m.group(2).split()
            uris, suites = fields.get("uris", []), fields.get("suites", [])
            if uris and not all(s.endswith("-security") for s in suites):
                return uris[0]
    if _SOURCES_LIST.is_file():
        for line in _SOURCES_LIST.read_text().splitlines():
            parts = re.sub(r"\[[^]]*\]", "", line).split()
            if len(parts) >= 3 and parts[0] == "deb" and not parts[2].endswith("-security"):
                return parts[1]
    raise FetchError(
        f"no Debian mirror found in {_SOURCES_DEB822} or {_SOURCES_LIST} "
        "(set UBLKSHELL_DEBIAN_MIRROR to one)"
    )


def _apt_dir(suite: str = SUITE) -> Path:
    # one private apt state per suite: each suite's lists name only its own versions
    return cache_root() / ("apt" if suite == SUITE else f"apt-{suite}")


def _apt_opts(suite: str = SUITE) -> list[str]:
    a = _apt_dir(suite)
    return [
        "-o", "APT::Sandbox::User=root",
        "-o", f"Dir::Etc::sourcelist={a / 'sources.list'}",
        "-o", "Dir::Etc::sourceparts=-",
        # Host pins must not hide or prefer versions in our private suite.
        "-o", f"Dir::Etc::preferences={a / 'preferences'}",
        "-o", f"Dir::Etc::preferencesparts={a / 'preferences.d'}",
        "-o", f"Dir::State::Lists={a / 'lists'}",
        "-o", f"Dir::Cache={a / 'cache'}",
    ]


def _run(cmd: list[str], *, cwd: Path | None = None, what: str) -> str:
    try:
        p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise FetchError(f"{what}: {cmd[0]} not found (this needs a Debian-like host)") from None
    if p.returncode != 0:
        lines = [l for l in (p.stderr or p.stdout).splitlines() if l.strip()]
        raise FetchError(f"{what} failed: {lines[-1] if lines else f'exit {p.returncode}'}")
    return p.stdout


@contextlib.contextmanager
def _locked():
    # pytest workers and VM runs may fetch at once; apt's own lock would just make one fail.
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _lists_present(suite: str = SUITE) -> bool:
    return any((_apt_dir(suite) / "lists").glob("*_Packages*"))


def _update(reason: str, suite: str = SUITE) -> None:
    a = _apt_dir(suite)
    for d in ("lists/partial", "cache/archives/partial", "preferences.d"):
        (a / d).mkdir(parents=True, exist_ok=True)
    (a / "preferences").touch()
    (a / "sources.list").write_text(f"deb [signed-by={KEYRING}] {_mirror()} {suite} main\n")
    progress(f"apt-get update for {suite} ({reason})")
    p = subprocess.run(["apt-get", *_apt_opts(suite), "-qq", "update"], capture_output=True, text=True)
    # apt-get update exits 0 when a mirror is unreachable (it only warns), so check the lists.
    if p.returncode != 0 or not _lists_present(suite):
        lines = [l for l in (p.stderr + p.stdout).splitlines() if l.strip()]
        why = next((l.strip() for l in lines if "Failed to fetch" in l or l.startswith("E:")),
                   lines[-1].strip() if lines else f"exit {p.returncode}")
        raise FetchError(f"apt-get update found no {suite} package lists at {_mirror()}: {why}")


def _ensure_lists(suite: str = SUITE) -> None:
    if not _lists_present(suite) or not (_apt_dir(suite) / "sources.list").is_file():
        _update("first use", suite)


def _download(pkgs: list[str], dest: Path, suite: str = SUITE) -> list[Path]:
    """Download pkgs into dest, refreshing the lists once if they are stale."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = ["apt-get", *_apt_opts(suite), "-qq", "download", *pkgs]
    try:
        _run(cmd, cwd=dest, what=f"apt-get download {' '.join(pkgs)}")
    except FetchError:
        # A mirror drops superseded versions, so old lists yield 404s.
        _update("package lists out of date", suite)
        _run(cmd, cwd=dest, what=f"apt-get download {' '.join(pkgs)}")
    debs = sorted(dest.glob("*.deb"))
    if not debs:
        raise FetchError(f"apt-get download {' '.join(pkgs)} produced no .deb")
    return debs


def _extract(debs: list[Path], target: Path) -> None:
    """Unpack debs into target, atomically, so an interrupted run leaves no half tree."""
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=target.parent))
    try:
        for d in debs:
            _run(["dpkg", "-x", str(d), str(tmp)], what=f"dpkg -x {d.name}")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _candidate_version(pkg: str) -> str:
    out = _run(["apt-cache", *_apt_opts(), "policy", pkg], what=f"apt-cache policy {pkg}")
    m = re.search(r"Candidate:\s*(\S+)", out)
    if not m or m.group(1) == "(none)":
        raise FetchError(f"{pkg} is not available in {SUITE}")
    return m.group(1)


def resolve_kernel_version(suite: str = SUITE) -> str:
    """The ABI name (e.g. 7.3.4+deb13-amd64) linux-image-amd64 depends on in suite."""
    _ensure_lists(suite)
    out = _run(["apt-cache", *_apt_opts(suite), "depends", "linux-image-amd64"],
               what="apt-cache depends linux-image-amd64")
    m = re.search(r"Depends:\s*linux-image-(\d\S*)", out)
    if not m:
        raise FetchError(f"linux-image-amd64 in {suite} names no kernel image")
    return m.group(1)


def _kernel_packages(ver: str, suite: str) -> list[str]:
    # Newer packaging splits the image into linux-binary-VER and linux-modules-VER; older
    # suites ship one linux-image-VER holding both.
    p = subprocess.run(["apt-cache", *_apt_opts(suite), "show", f"linux-binary-{ver}"],
                       capture_output=True, text=True)
    if p.returncode == 0 and p.stdout.strip():
        return [f"linux-binary-{ver}", f"linux-modules-{ver}"]
    return [f"linux-image-{ver}"]


def fetch_kernel(refresh: bool = False, kernel: str = "newest") -> tuple[str, Path]:
    """Return (kernel version, extracted root holding boot files and usr/lib/modules/VER).

    kernel names a suite in KERNELS. A cached kernel is reused without asking the mirror;
    refresh=True (or UBLKSHELL_VM_REFRESH=1) re-resolves the newest version.
    """
    if kernel not in KERNELS:
        raise FetchError(f"unknown kernel {kernel!r} (one of: {', '.join(KERNELS)})")
    suite = KERNELS[kernel]
    refresh = refresh or os.environ.get("UBLKSHELL_VM_REFRESH") == "1"
    base = cache_root() / "kernel"
    current = base / ("current" if suite == SUITE else f"current-{suite}")
    with _locked():
        if not refresh and current.is_file():
            ver = current.read_text().strip()
            root = base / ver / "root"
            if (root / "usr/lib/modules" / ver).is_dir():
                return ver, root
        if refresh:
            _update("refresh requested", suite)
        ver = resolve_kernel_version(suite)
        root = base / ver / "root"
        if not (root / "usr/lib/modules" / ver).is_dir():
            progress(f"fetching kernel {ver} from {suite} (once, cached in {base})")
            debs_dir = base / ver / "debs"
            shutil.rmtree(debs_dir, ignore_errors=True)
            debs = _download(_kernel_packages(ver, suite), debs_dir, suite)
            _extract(debs, root)
            shutil.rmtree(debs_dir, ignore_errors=True)
        current.write_text(ver + "\n")
        return ver, root


def fetch_uapi_header(refresh: bool = False) -> Path:
    """Return the path of usr/include/linux/ublk_cmd.h from trixie-backports' linux-libc-dev."""
    base = cache_root() / "libc-dev"
    current = base / "current"
    with _locked():
        if not refresh and current.is_file():
            hdr = base / current.read_text().strip() / "root/usr/include/linux/ublk_cmd.h"
            if hdr.is_file():
                return hdr
        if refresh:
            _update("refresh requested")
        else:
            _ensure_lists()
        ver = _candidate_version("linux-libc-dev")
        # Epochs put ':' in versions; keep directory names plain.
        key = ver.replace(":", "_")
        root = base / key / "root"
        hdr = root / "usr/include/linux/ublk_cmd.h"
        if not hdr.is_file():
            progress(f"fetching linux-libc-dev {ver} (once, cached in {base})")
            debs_dir = base / key / "debs"
            shutil.rmtree(debs_dir, ignore_errors=True)
            debs = _download([f"linux-libc-dev={ver}"], debs_dir)
            _extract(debs, root)
            shutil.rmtree(debs_dir, ignore_errors=True)
        if not hdr.is_file():
            raise FetchError(f"linux-libc-dev {ver} has no linux/ublk_cmd.h")
        current.write_text(key + "\n")
        return hdr


if __name__ == "__main__":
    try:
        print(fetch_kernel())
        print(fetch_uapi_header())
    except FetchError as e:
        print(f"vm: {e}", file=sys.stderr)
        sys.exit(1)
