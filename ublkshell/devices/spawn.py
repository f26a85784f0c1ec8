"""Starting an IO daemon (`python -m ublkshell.bridge.daemon` or the FUSE one) and waiting
until it serves or says why not: `add` and `recover` both come here."""
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time

from . import paths
from ..errors import UblkError

ADD_TIMEOUT = float(os.environ.get("UBLKSHELL_ADD_TIMEOUT", "120"))
DAEMON_MODULE = "ublkshell.bridge.daemon"


def _log_tail(path: str, lines: int = 3) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return " | ".join(l.strip() for l in text.splitlines()[-lines:] if l.strip())


def daemon_command(module: str) -> tuple[list[str], dict]:
    """argv and environment for `python -m module`, importing this very ublkshell.

    `python -m` puts the working directory first on sys.path: started from a
    source checkout, a daemon would import the checkout instead of the
    installed package (and fail without its compiled extension). -P drops
    that entry, PYTHONPATH names the directory this ublkshell came from, and
    the daemon runs in / so that it holds no directory of any filesystem.

    Where no sitecustomize or usercustomize runs here (they would expect to run
    there too), -S skips `site`, which costs about 0.3 s a start under software
    emulation, and the path it would build is this process's own."""
    pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    path = [pkg_root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    flags = ["-P"]
    if "sitecustomize" not in sys.modules and "usercustomize" not in sys.modules:
        flags.append("-S")
        path += [p for p in sys.path if p and p not in path and os.path.exists(p)]
    env["PYTHONPATH"] = os.pathsep.join(path)
    return [sys.executable, *flags, "-m", module], env


def spawn_daemon(spec: dict, timeout: float = ADD_TIMEOUT, module: str = DAEMON_MODULE) -> dict:
    """Start an IO daemon for spec (a new device, or `"recover": true` for an
    existing one) in its own session; return what it reports once it serves."""
    # O_EXCL, mode 0600, a name nobody can take first
    fd, log = tempfile.mkstemp(dir=paths.logdir(), prefix=f"daemon-{int(time.time() * 1000)}-",
                               suffix=".log")
    r, w = os.pipe()
    argv, env = daemon_command(module)
    env["UBLKSHELL_DAEMON_LOG"] = log
    try:
        proc = subprocess.Popen(
            argv + ["--spec", json.dumps(spec), "--ready-fd", str(w)],
            pass_fds=(w,), stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, cwd="/",
            start_new_session=True, env=env)
    finally:
        os.close(fd)
        os.close(w)
    buf = b""
    deadline = time.monotonic() + timeout
    try:
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                # our own child, not yet reaped: its pid (and process group) cannot be reused
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise UblkError(f"the device daemon did not start within {timeout:.0f} s (log: {log})")
            ready, _, _ = select.select([r], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(r, 4096)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > 1 << 20:
                    break
    finally:
        os.close(r)
    try:
        msg = json.loads(buf.decode().splitlines()[0]) if buf.strip() else None
    except (ValueError, UnicodeDecodeError):
        msg = None
    if not isinstance(msg, dict):
        _reap(proc)
        raise UblkError(f"the device daemon exited ({proc.returncode}) before serving: "
                        f"{_log_tail(log) or 'see ' + log}")
    if not msg.get("ok"):
        _reap(proc)
        raise UblkError(str(msg.get("error") or "the device daemon failed"))
    return msg["device"]


def _reap(proc) -> None:
    """A daemon that said it failed exits on its own; one that hangs on its way out is killed."""
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
