"""docs/examples/ against the commands as they are now: scripts/examples.py runs every example
again (real FUSE devices, loop devices, dd, fio, blkparse, btt) and its output must match the
committed files in everything but what varies from run to run (numbers and the units printed
with them, times, pids, loop device numbers; runs of equal rows), so that a changed column,
header, key or error text fails here with a diff. And every `ublkshell ...` line the examples
show must still parse, so that none shows an option or verb that no longer exists."""
import importlib.util
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ublkshell.commands import cli_parser
from ublkshell.errors import UsageError

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "examples.py"
EXAMPLES = REPO / "docs" / "examples"
# what ends the ublkshell part of a shown line: `ublkshell metrics | head -n 24`, `... &`
SHELL_WORDS = {"|", "||", "&&", ";", "&", ">", ">>", "<"}


def _generator():
    spec = importlib.util.spec_from_file_location("examples_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gen = _generator()


def shown_commands():
    """(file, line) for every `# ublkshell ...` command in docs/examples."""
    for path in sorted(EXAMPLES.glob("*_example.txt")):
        for line in path.read_text().splitlines():
            if line.startswith("# ublkshell"):
                yield path.name, line[2:]


def test_every_shown_command_parses():
    cmds = list(shown_commands())
    assert len(cmds) >= 40, "docs/examples shows fewer commands than it did: is it there?"
    verbs = set()
    for name, line in cmds:
        words = shlex.split(line)
        for i, w in enumerate(words):
            if w in SHELL_WORDS:
                words = words[:i]
                break
        assert words[0] == "ublkshell", (name, line)
        try:
            args, extra = cli_parser().parse_known_args(words[1:])
        except UsageError as e:
            pytest.fail(f"{name}: `{line}` no longer parses: {e}; run scripts/examples.py to regenerate")
        # as cli._dispatch: only trace's and record's filters may follow the options
        assert not extra or (args.verb in ("trace", "record") and not any(e.startswith("-") for e in extra)), \
            f"{name}: `{line}`: unrecognized arguments {extra}; run scripts/examples.py to regenerate"
        verbs.add(args.verb)
    # each file shows its own verb at work
    for path in EXAMPLES.glob("*_example.txt"):
        assert path.name.removesuffix("_example.txt") in verbs, path.name


def test_index_lists_every_example():
    index = (EXAMPLES / "README.md").read_text()
    names = sorted(p.name for p in EXAMPLES.glob("*_example.txt"))
    assert names and all(f"]({n})" in index for n in names), "docs/examples/README.md misses a file"
    assert "docs/examples/README.md" in (REPO / "README.md").read_text()


def test_masking_keeps_what_matters():
    """Numbers, units with them, bars and equal rows vary; words, columns and keys do not."""
    n = gen.normalize
    assert n("read  144489  564.4M  0  5.8us  98.7ms") == n("read 12 1.2G 3 812ns 1.3s") == ["read N N N N N"]
    assert n("dev fuse90 -> /dev/loop2") == n("dev fuse91 -> /dev/loop13")
    assert n("  1.02us .. 2.05us  38052 ####\n  2.1ms .. 4.19ms  3 #") == ["N .. N N #"]
    assert n('{"device": "fuse90", "ios": 3}') != n('{"device": 90, "ios": 3}')
    assert n("OP IOS BYTES ERRORS AVG") != n("OP IOS BYTES ERRS AVG")
    assert n("(exit status 1)") != n("(exit status 2)")
    assert n("dd: error reading '/dev/loop1': Input/output error") != n("dd: error reading '/dev/loop1': No space")


def test_examples_match_the_commands(tmp_path):
    assert os.geteuid() == 0 and os.path.exists("/dev/fuse"), "needs root and /dev/fuse (scripts/setup.sh)"
    out = tmp_path / "examples"
    p = subprocess.Popen([sys.executable, str(SCRIPT), "--out", str(out)], cwd="/",
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log, _ = p.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        # SIGTERM: the script deletes its devices on the way out
        p.send_signal(signal.SIGTERM)
        log, _ = p.communicate(timeout=60)
        pytest.fail(f"scripts/examples.py took over 150 s:\n{log}")
    assert p.returncode == 0, f"scripts/examples.py failed:\n{log}"
    problems = gen.compare(EXAMPLES, out)
    assert not problems, (f"docs/examples does not match what the commands print now: {gen.REGEN}\n\n"
                          + "\n\n".join(problems))
