"""`ublkshell completion bash|zsh` in the real shells. The script comes from the command line (run
from `/`), bash sources it (alone, and the way bash-completion loads /etc/bash_completion.d) and
its completion function is called as readline calls it; zsh autoloads it from $fpath through
compinit and a real line editor in a pty presses Tab. Device ids come from a real FUSE-transport
device and from a stand-in for /sys/class/ublk-char (this host has no ublk_drv).

zsh, bash-completion and pexpect are installed by scripts/setup.sh: if one is missing the test
fails, it does not skip."""
import argparse
import os
import shutil
import subprocess
import sys

import pexpect
import pytest

from ublkshell import commands, completions
from ublkshell.errors import UsageError
from ublkshell.observe.names import IO_OPS
from ublkshell.observe.trace import TRACE_FORMATS
from ublkshell.repl.shell import Shell

BASH_COMPLETION = "/usr/share/bash-completion/bash_completion"

# what readline does on Tab: split the line, call the function `complete -F` registered, print COMPREPLY
BASH_TAB = r'''
spec=$(complete -p ublkshell) || exit 3
fn=${spec##* -F }
fn=${fn%% *}
line=$1
read -ra COMP_WORDS <<< "$line"
[[ $line == *" " ]] && COMP_WORDS+=("")
COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
COMP_LINE=$line
COMP_POINT=${#line}
"$fn" ublkshell "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
printf '%s\n' "${COMPREPLY[@]}"
'''


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: scripts/setup.sh installs it"
    return path


def ublkshell(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "ublkshell", *args], capture_output=True, text=True,
                          timeout=60, env=env, cwd=cwd)


def walk(parser: argparse.ArgumentParser):
    """Every action of parser and of its verbs' parsers."""
    for action in parser._actions:
        yield action
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from walk(sub)


def public_verbs() -> list[str]:
    return [a.dest for a in commands.subparsers(commands.cli_parser())._choices_actions]


@pytest.fixture(scope="module")
def where(tmp_path_factory):
    """The scripts as installed, a private state dir with one real FUSE device, and a stand-in
    /sys/class/ublk-char with ublk devices 0 and 12."""
    root = tmp_path_factory.mktemp("completion")
    env = dict(os.environ, UBLKSHELL_STATE_DIR=str(root / "state"), UBLKSHELL_DATA_DIR=str(root / "mem"),
               HOME=str(root))
    os.makedirs(root / "mem", mode=0o700)
    sysfs = root / "ublk-char"
    sysfs.mkdir()
    for name in ("ublkc0", "ublkc12", "ublkcX", "ublkb3", "control"):
        (sysfs / name).touch()
    scripts = {}
    for shell in commands.COMPLETION_SHELLS:
        # from outside the checkout: the installed command writes it, nothing of the tree's is read
        p = ublkshell("completion", shell, env=env, cwd="/")
        assert (p.returncode, p.stderr) == (0, ""), p.stderr
        assert completions.UBLK_CHAR_DIR in p.stdout
        scripts[shell] = p.stdout
    (root / "bash").mkdir()
    (root / "bash" / "ublkshell").write_text(scripts["bash"])
    (root / "bash-fake-sysfs").write_text(scripts["bash"].replace(completions.UBLK_CHAR_DIR, str(sysfs)))
    (root / "zsh").mkdir()
    (root / "zsh" / "_ublkshell").write_text(scripts["zsh"].replace(completions.UBLK_CHAR_DIR, str(sysfs)))
    p = ublkshell("add", "--transport", "fuse", "-t", "mem", "--size", "16M", env=env)
    try:
        assert p.returncode == 0, f"a FUSE device for the id tests (root, /dev/fuse): {p.stderr}"
        assert os.path.isdir(root / "state" / "fuse" / "fuse0"), p.stdout
        yield argparse.Namespace(root=root, env=env, scripts=scripts)
    finally:
        p = ublkshell("del", "-a", env=env)
        assert p.returncode == 0, p.stderr


def real_ublk_ids() -> list[str]:
    try:
        names = os.listdir(completions.UBLK_CHAR_DIR)
    except FileNotFoundError:
        return []
    return [n[5:] for n in names if n.startswith("ublkc") and n[5:].isdigit()]


# -- the verb --------------------------------------------------------------------------------
def test_an_unknown_shell_is_one_line_and_exit_2():
    for args, message in [(["fish"], "ublkshell: completion: unknown shell 'fish' (choose from bash, zsh)"),
                          ([], "ublkshell: the following arguments are required: bash|zsh")]:
        p = ublkshell("completion", *args)
        assert (p.returncode, p.stdout, p.stderr) == (2, "", message + "\n")
    with pytest.raises(UsageError, match=r"^completion: unknown shell 'Bash' \(choose from bash, zsh\)$"):
        completions.script("Bash")


def test_help_teaches_how_to_install_it():
    p = ublkshell("completion", "--help")
    assert p.returncode == 0
    for line in ("ublkshell completion bash > /etc/bash_completion.d/ublkshell",
                 "source <(ublkshell completion bash)",
                 'ublkshell completion zsh > "${fpath[1]}/_ublkshell"'):
        assert line in p.stdout
    assert "ublkshell completion bash" in ublkshell("--help").stdout


def test_offers_reach_the_script_without_changing_what_the_parser_accepts():
    actions = list(walk(commands.cli_parser()))
    # every a|b|c metavar is offered as it reads, and nothing is refused by argparse's choices
    for a in actions:
        if "|" in (a.metavar or ""):
            assert getattr(a, "offers", None) == tuple(a.metavar.split("|")), a.option_strings or a.dest
        if not isinstance(a, argparse._SubParsersAction):
            assert a.choices is None, a.option_strings or a.dest
    args = commands.cli_parser().parse_args(["add", "-t", "tape", "--io-mode", "warp", "--zero-copy", "x"])
    assert (args.type, args.io_mode, args.zero_copy) == ("tape", "warp", "x")  # validate.py says no, later
    p = ublkshell("add", "-t", "mem", "--size", "1G", "--io-mode", "warp",
                  env=dict(os.environ, UBLKSHELL_STATE_DIR="/tmp/ublkshell-test-state"))
    # validate.py's words, not argparse's "argument --io-mode: invalid choice: ..."
    assert (p.returncode, p.stderr) == (
        2, "ublkshell: --io-mode: unknown mode 'warp' (choose from auto, batch, per-tag)\n")


def test_the_shell_keeps_completion_to_the_command_line():
    sh = Shell("/nonexistent.sock")
    with pytest.raises(UsageError, match="unknown command 'completion'"):
        sh.parse("completion bash")
    listed = [line.split()[0] for line in sh.help(None).splitlines()[1:]]
    assert "completion" not in listed and {"add", "stats", "trace", "help", "quit"} <= set(listed)


# -- bash ------------------------------------------------------------------------------------
def bash(where, line: str, script=None, prelude=None, env=None) -> list[str]:
    env = dict(env or where.env, SCRIPT=str(script or where.root / "bash" / "ublkshell"))
    p = subprocess.run([tool("bash"), "--norc", "--noprofile", "-c", (prelude or 'source "$SCRIPT"') + BASH_TAB,
                        "bash", line], capture_output=True, text=True, timeout=30, env=env)
    assert (p.returncode, p.stderr) == (0, ""), (line, p.returncode, p.stderr)
    return p.stdout.split()


def test_bash_completes_verbs_options_and_values(where):
    assert bash(where, "ublkshell ") == public_verbs()
    assert "completion" in public_verbs() and "vm" in public_verbs()
    assert bash(where, "ublkshell st") == ["stats"]
    options = bash(where, "ublkshell add --")
    assert {"--type", "--io-mode", "--zero-copy", "--transport", "--recovery", "--file", "--size"} <= set(options)
    assert bash(where, "ublkshell add -t ") == list(commands.TARGETS)
    assert set(bash(where, "ublkshell add -t ")) >= {"mem", "loop", "null"}
    assert bash(where, "ublkshell add -t mem --io-mode ") == ["auto", "batch", "per-tag"]
    assert bash(where, "ublkshell add --zero-copy ") == ["auto", "on", "off", "fallback"]
    assert bash(where, "ublkshell add --transport ") == ["ublk", "fuse"]
    assert bash(where, "ublkshell add --recovery ") == list(commands.RECOVERY_MODES)
    assert bash(where, "ublkshell metrics --format ") == ["prometheus", "openmetrics"]
    assert bash(where, "ublkshell trace 0 --format ") == list(TRACE_FORMATS)
    assert bash(where, "ublkshell record 0 --format ") == ["blktrace", "fio-iolog"]
    assert bash(where, "ublkshell lat 0 ") == list(IO_OPS)
    assert bash(where, "ublkshell completion ") == ["bash", "zsh"]
    assert bash(where, "ublkshell --socket /x add --io-mode p") == ["per-tag"]


def test_bash_completes_paths_for_files(where, tmp_path):
    (tmp_path / "disk.img").touch()
    (tmp_path / "runs").mkdir()
    for line in (f"ublkshell add -t loop -f {tmp_path}/", f"ublkshell add --file {tmp_path}/d",
                 f"ublkshell record 0 -o {tmp_path}/"):
        got = bash(where, line)
        assert f"{tmp_path}/disk.img" in got, (line, got)
    assert f"{tmp_path}/runs" in bash(where, f"ublkshell record 0 --output {tmp_path}/r")


def test_bash_completes_the_ids_of_devices_that_exist(where):
    fuse = ["fuse0"]
    assert sorted(bash(where, "ublkshell stats ")) == sorted(real_ublk_ids() + fuse)
    assert bash(where, "ublkshell del fu") == fuse
    assert bash(where, "ublkshell fail f") == fuse
    # ublk devices: their char devices in sysfs (ublkcN -> N), nothing else there
    fake = where.root / "bash-fake-sysfs"
    assert bash(where, "ublkshell stats ", script=fake) == ["0", "12", "fuse0"]
    assert bash(where, "ublkshell del 0 1", script=fake) == ["12"]
    assert bash(where, "ublkshell kill ", script=fake) == ["0", "12", "fuse0"]
    # cheap: bash's builtins alone, no python (nor any other program) runs on Tab
    assert bash(where, "ublkshell stats ", script=fake, env=dict(where.env, PATH="/nonexistent")) == \
        ["0", "12", "fuse0"]
    # no state dir of ours (another user, or nothing added yet): the ublk ids alone, no error
    gone = dict(where.env, UBLKSHELL_STATE_DIR=str(where.root / "nothing"))
    assert bash(where, "ublkshell top ", script=fake, env=gone) == ["0", "12"]


def test_bash_completion_loads_it_from_its_directory(where):
    """As installed by `completion --help`: a file in /etc/bash_completion.d (a stand-in directory
    here), which bash-completion reads when it starts."""
    assert os.path.exists(BASH_COMPLETION), \
        f"{BASH_COMPLETION} is missing: scripts/setup.sh installs bash-completion"
    env = dict(where.env, BASH_COMPLETION_COMPAT_DIR=str(where.root / "bash"))
    prelude = f"source {BASH_COMPLETION}\n"
    assert bash(where, "ublkshell add -t ", prelude=prelude, env=env) == list(commands.TARGETS)
    assert bash(where, "ublkshell inflight ", prelude=prelude, env=env) == sorted(real_ublk_ids()) + ["fuse0"]


# -- zsh -------------------------------------------------------------------------------------
# typed at the prompt, where # starts no comment; compadd -O/-A/-D calls are compsys's own bookkeeping
ZSH_SETUP = r'''
PS1='%% '
RPROMPT=''
unsetopt auto_list list_ambiguous list_beep beep
fpath=({fpath} $fpath)
autoload -U compinit && compinit -u -D
compadd() {{
  if (( ${{@[(I)-[OAD]]}} )); then builtin compadd "$@"; return; fi
  local -a got
  builtin compadd -O got "$@"
  (( $#got )) && print -rl -- $got >> {out}
  builtin compadd "$@"
}}
'''


class Zsh:
    """One interactive zsh -f in a pty with compinit: Tab on a line records what compadd was given
    (after zsh matched it against the line), then the line is cleared."""

    def __init__(self, where):
        self.out = where.root / "zsh-matches"
        self.n = 0
        self.z = pexpect.spawn(tool("zsh"), ["-f", "-i"], env=dict(where.env, TERM="dumb"),
                               dimensions=(50, 250), encoding="utf-8", timeout=30)
        for line in ZSH_SETUP.format(fpath=where.root / "zsh", out=self.out).strip().splitlines():
            self.z.sendline(line)
        self.sync()

    def sync(self) -> None:
        # the marker is computed, so its echo on the line is not what expect sees
        self.n += 1
        self.z.sendline(f"print -r -- DONE$(({self.n}+1000))")
        self.z.expect(f"DONE{self.n + 1000}")

    def tab(self, line: str) -> list[str]:
        self.out.unlink(missing_ok=True)
        self.z.send(line + "\t")
        self.z.send("\x15")  # Ctrl-U: the line goes, the shell stays
        self.sync()
        return self.out.read_text().split() if self.out.exists() else []

    def close(self) -> None:
        self.z.sendline("exit")
        self.z.expect(pexpect.EOF)


def test_zsh_parses_the_script(where, tmp_path):
    path = tmp_path / "_ublkshell"
    path.write_text(where.scripts["zsh"])
    p = subprocess.run([tool("zsh"), "-n", str(path)], capture_output=True, text=True, timeout=30)
    assert (p.returncode, p.stderr) == (0, "")
    assert where.scripts["zsh"].startswith("#compdef ublkshell\n")  # what compinit looks for in $fpath


def test_zsh_completes_verbs_options_values_and_ids(where):
    z = Zsh(where)
    try:
        assert sorted(z.tab("ublkshell ")) == sorted(public_verbs())
        assert z.tab("ublkshell sta") == ["stats"]
        options = set(z.tab("ublkshell add --"))
        assert {"--type", "--io-mode", "--zero-copy", "--transport", "--recovery"} <= options
        assert z.tab("ublkshell add -t ") == list(commands.TARGETS)
        assert z.tab("ublkshell add -t mem --io-mode ") == ["auto", "batch", "per-tag"]
        assert z.tab("ublkshell add --transport ") == ["ublk", "fuse"]
        assert z.tab("ublkshell lat 0 ") == list(IO_OPS)
        assert z.tab("ublkshell completion ") == ["bash", "zsh"]
        # the stand-in sysfs has ublkc0 and ublkc12; fuse0 is the real FUSE device
        assert sorted(z.tab("ublkshell stats ")) == ["0", "12", "fuse0"]
        assert z.tab("ublkshell delay fu") == ["fuse0"]
        assert sorted(z.tab("ublkshell top ")) == ["0", "12", "fuse0"]
    finally:
        z.close()
