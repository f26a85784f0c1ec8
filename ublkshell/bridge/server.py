"""`ublkshell serve`: the trio server behind the REPL, the FUSE stats tree and
the Python API. It owns no IO: each device keeps its own daemon process. The
server answers clients on a root-only unix socket (rpc.py), watches the daemons
(supervisor.py) and serves the stats tree (tree/).

Crash-only: devices belong to their daemons, so the server may die at any
moment (a bug, SIGKILL, the OOM killer) and lose nothing; a new server adopts
the devices it finds. No request, connection or stats-tree handler can end
it: each failure is answered (or logged) and the rest goes on. SIGTERM stops
it and leaves the devices running; deleting them is the explicit choice
(`serve --delete-devices`, or `shutdown` with `delete`)."""
import os
import signal
import traceback

import trio

from ..errors import UblkError
from .events import Events, log, one_line
from .protocol import SOCKET_PATH
from .rpc import Rpc, bind_socket
from .source import DeviceSource
from .supervisor import Supervisor, delete_all_ours, keep

DEFAULT_MOUNT = "/mnt/ublkstats"


def default_mount() -> str:
    """root's tree is /mnt/ublkstats; a user's own server mounts theirs (through the setuid
    fusermount3, without allow_other) inside their private state dir, where no other
    user can have made the name first."""
    if os.geteuid() == 0:
        return DEFAULT_MOUNT
    from ..files import state_dir

    return os.path.join(state_dir(), "stats")


class Server:
    def __init__(self, socket_path=SOCKET_PATH, mountpoint=DEFAULT_MOUNT, delete_devices=False,
                 auto_recover=False):
        self.socket_path = socket_path
        self.mountpoint = mountpoint
        self.delete_devices = delete_devices
        self.events = Events()
        self.source = DeviceSource()
        self.stop = trio.Event()
        self.rpc = Rpc(self.events, self.source, mountpoint, self._shutdown)
        self.supervisor = Supervisor(self.events, self.source, auto_recover)

    def _shutdown(self, delete: bool) -> None:
        self.delete_devices = self.delete_devices or delete
        self.stop.set()

    async def _tree(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            from .tree.mount import run_tree
        except ImportError as e:
            log(f"stats tree disabled: {e}")
            task_status.started()
            return
        started = []

        class Status:
            def started(self, value=None):
                started.append(True)
                task_status.started(value)

        try:
            await run_tree(self.mountpoint, self.source, task_status=Status())
        except Exception as e:
            # the server goes on without the tree, whether it failed before or after mounting
            log(f"stats tree on {self.mountpoint} failed: {one_line(str(e)) or type(e).__name__}")
            if not isinstance(e, (OSError, UblkError)):
                log(traceback.format_exc())
            if not started:
                task_status.started()

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        sock = await bind_socket(self.socket_path)
        ino = os.stat(self.socket_path).st_ino
        log(f"listening on {self.socket_path}")
        stopped = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(keep, "accept loop", self.rpc.accept, sock, nursery)
                nursery.start_soon(keep, "daemon watch", self.supervisor.watch, nursery)
                if self.mountpoint:
                    await nursery.start(self._tree)
                task_status.started()
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
                    async def on_signal():
                        async for s in sigs:
                            log(f"signal {s}: stopping")
                            self.stop.set()
                            return
                    nursery.start_soon(on_signal)
                    await self.stop.wait()
                nursery.cancel_scope.cancel()
            stopped = True
        finally:
            sock.close()
            try:
                if os.stat(self.socket_path).st_ino == ino:
                    os.unlink(self.socket_path)
            except FileNotFoundError:
                pass
            # crash-only: devices belong to their daemons; only a clean stop that was
            # asked to (serve --delete-devices, shutdown with delete) deletes them
            if stopped and self.delete_devices:
                await trio.to_thread.run_sync(delete_all_ours)
            log("stopped" if stopped else "stopped by an error; the devices keep running")


def serve(socket_path=SOCKET_PATH, mountpoint=DEFAULT_MOUNT, delete_devices=False,
          auto_recover=False) -> int:
    trio.run(Server(socket_path, mountpoint or None, delete_devices, auto_recover).run)
    return 0
