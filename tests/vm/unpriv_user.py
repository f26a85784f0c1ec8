"""Run as a test user by tests/vm/test_unprivileged.py: several CLI calls in one
interpreter (each fresh one costs seconds under emulation), one JSON line out.

argv[1]: a JSON list of steps, each a CLI argv list, ["connect", SOCKET] (a request
straight to a server's socket), ["listdir", PATH] or ["read", PATH]."""
import contextlib
import io
import json
import sys


def _cli(argv):
    from ublkshell.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 2
    return {"argv": argv, "rc": rc, "out": out.getvalue(), "err": err.getvalue()}


def _connect(path):
    from ublkshell.bridge.client import Client

    try:
        with Client(path, timeout=10) as c:
            return {"argv": ["connect", path], "rc": 0, "out": json.dumps(c.call("list")), "err": ""}
    except Exception as e:  # what B sees is the point: report it, whatever it is
        return {"argv": ["connect", path], "rc": 1, "out": "", "err": f"{type(e).__name__}: {e}"}


def _listdir(path):
    import os

    try:
        return {"argv": ["listdir", path], "rc": 0, "out": json.dumps(sorted(os.listdir(path))), "err": ""}
    except OSError as e:
        return {"argv": ["listdir", path], "rc": 1, "out": "", "err": f"{type(e).__name__}: {e}"}


def _read(path):
    try:
        with open(path) as f:
            return {"argv": ["read", path], "rc": 0, "out": f.read(), "err": ""}
    except OSError as e:
        return {"argv": ["read", path], "rc": 1, "out": "", "err": f"{type(e).__name__}: {e}"}


def main():
    results = []
    steps = {"connect": _connect, "listdir": _listdir, "read": _read}
    for step in json.loads(sys.argv[1]):
        results.append(steps[step[0]](step[1]) if step[0] in steps else _cli(step))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
