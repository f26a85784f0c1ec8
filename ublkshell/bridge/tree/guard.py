"""Every stats tree handler is guarded: an exception escaping one would end pyfuse3's loop
(and with it the tree) and leave a dead mount."""
import errno
import functools
import inspect
import logging

import pyfuse3

from .content import Gone

log = logging.getLogger(__name__)


def _guard(fn):
    """Unexpected errors become EIO: an exception escaping a handler would
    end pyfuse3's main loop (and with it the tree) and leave a dead mount."""
    if fn.__name__ == "forget":
        # the kernel expects no answer to a forget: nothing to turn an error into
        @functools.wraps(fn)
        async def quiet(*args, **kwargs):
            try:
                return await fn(*args, **kwargs)
            except Exception as e:
                log.error("stats tree: forget failed: %s: %s", type(e).__name__, e)
        return quiet

    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Gone:
            raise pyfuse3.FUSEError(errno.EIO) from None
        except Exception as e:
            log.error("stats tree: %s failed: %s: %s", fn.__name__, type(e).__name__, e)
            raise pyfuse3.FUSEError(errno.EIO) from None
    return wrapper


def guard_handlers(cls):
    """_guard every request handler a pyfuse3.Operations subclass defines."""
    for name, fn in list(vars(cls).items()):
        if inspect.iscoroutinefunction(fn) and hasattr(pyfuse3.Operations, name):
            setattr(cls, name, _guard(fn))
    return cls
