"""`top`: sample every device's stats each interval and show the frame views.py makes of
two samples, full screen on a terminal (prompt_toolkit) or as plain frames otherwise.

The sampler is the caller's: the command line reads the devices itself, the shell asks
the server, so the same loop serves both faces."""
import asyncio
import time
from typing import Callable

from ..devices import ids as devids
from ..errors import UblkError, UsageError
from . import views

# (ids asked for or [] for all) -> (ids, {id: stats}, {id: one-line error})
Sampler = Callable[[list], tuple[list, dict, dict]]


def sampler(call: Callable) -> Sampler:
    """A Sampler from a face's way of running a verb: call(verb, **args) -> result."""
    def sample(ids):
        listed = ids or sorted(d["id"] for d in call("list"))
        stats, errors = {}, {}
        for dev_id in listed:
            try:
                stats[dev_id] = call("stats", id=dev_id, histograms=True)
            except UsageError:
                raise
            except UblkError as e:
                errors[dev_id] = " ".join(str(e).split())
        return listed, stats, errors
    return sample


class Frames:
    """Successive frames, each over the interval since the one before."""

    def __init__(self, sample: Sampler, ids: list, interval: float):
        self.sample, self.ids, self.interval = sample, ids, interval
        # the first sample raises what the user got wrong (an unknown id) before any screen
        _, self.old, _ = sample(ids)
        self.t_old = time.monotonic()

    def next(self) -> str:
        try:
            ids, new, errors = self.sample(self.ids)
        except UsageError:
            raise
        except (UblkError, OSError) as e:
            # the server went away or a device vanished mid-list: say so in the frame, keep going
            return f"ublkshell top: {' '.join(str(e).split())}"
        t_new = time.monotonic()
        samples = [(devids.name(i), self.old.get(i), new.get(i), errors.get(i)) for i in ids]
        frame = views.render_top(samples, t_new - self.t_old, self.interval)
        self.old, self.t_old = new, t_new
        return frame


def run_top(sample: Sampler, ids: list, interval: float, count: int, batch: bool, out) -> None:
    frames = Frames(sample, ids, interval)
    # a set number of frames is for logs and scripts, as top -b -n is
    if batch or count or not out.isatty():
        shown = 0
        while not count or shown < count:
            time.sleep(interval)
            print(frames.next() + "\n", file=out, flush=True)
            shown += 1
        return
    _full_screen(frames, count)


def _full_screen(frames: Frames, count: int) -> None:
    from prompt_toolkit.application import Application
    from prompt_toolkit.key_binding import KeyBindings
    from prompt_toolkit.layout import Layout, Window
    from prompt_toolkit.layout.controls import FormattedTextControl

    text = ["ublkshell top: sampling ... (q: quit)"]
    keys = KeyBindings()

    @keys.add("q")
    @keys.add("c-c")
    @keys.add("escape", eager=True)
    def _quit(event):
        event.app.exit()

    app = Application(layout=Layout(Window(FormattedTextControl(lambda: text[0]))), key_bindings=keys,
                      full_screen=True)

    async def refresh():
        shown = 0
        while not count or shown < count:
            await asyncio.sleep(frames.interval)
            # sampling blocks on files or the server's socket: off the loop, so keys stay live
            text[0] = await asyncio.to_thread(frames.next) + "\n(q: quit)"
            shown += 1
            app.invalidate()
        app.exit()

    app.pre_run_callables.append(lambda: app.create_background_task(refresh()))
    app.run()
