"""Tab completion for the shell: verbs, device ids, targets, ops, options
(read from the same argparse parser that parses the line), trace filters and
file paths. Candidates are plain functions of the words so far."""
from prompt_toolkit.completion import Completer, Completion, PathCompleter
from prompt_toolkit.document import Document

from ..faults.grammar import ACTION_WORDS, ACTIONS, MATCH_WORDS
from ..devices import ids as devids
from ..commands import ID_VERBS, MULTI_ID_VERBS, RECOVERY_MODES, TARGETS, VERBS
from ..observe.names import IO_OPS as OPS
from ..observe.trace import FILTER_KEYS

# words that stand alone or take their value as the next word
_BARE = {"fua": "fua", "tag": "tag", "lba": "lba"}
_VALUES = {"mode": ("error", "drop"), "errno": ("EIO", "ENOSPC", "ETIMEDOUT", "ENODATA", "EROFS")}


def rule_words(action: str, cur: str) -> list[str]:
    """What a fault rule may say next: its words as `key=` (or bare), values of op=/mode=/errno=."""
    key, eq, val = cur.partition("=")
    if eq and key == "op":
        done, _, last = val.rpartition(",")
        prefix = f"op={done + ',' if done else ''}"
        return [prefix + o for o in OPS if o.startswith(last)]
    if eq and key in _VALUES:
        return [f"{key}={v}" for v in _VALUES[key] if v.startswith(val)]
    keys = set(ACTION_WORDS[action]) | (set() if action == "badblocks" else set(MATCH_WORDS))
    return sorted(_BARE.get(k, f"{k}=") for k in keys if _BARE.get(k, f"{k}=").startswith(cur))


def _options(subparser) -> dict:
    """option string -> whether it takes a value."""
    return {s: a.nargs != 0 for a in subparser._actions for s in a.option_strings}


def _offered(subparser) -> dict:
    """option string -> the words Tab offers for its value (paths are the caller's)."""
    out = {}
    for a in subparser._actions:
        words = getattr(a, "offers", None)
        if isinstance(words, (tuple, list)) and a.option_strings:
            out.update(dict.fromkeys(a.option_strings, words))
    return out


def _positionals(words: list[str], options: dict) -> list[str]:
    out, skip = [], False
    for w in words:
        if skip:
            skip = False
        elif w.startswith("-"):
            skip = options.get(w.split("=", 1)[0], False) and "=" not in w
        else:
            out.append(w)
    return out


def candidates(shell, words: list[str], cur: str) -> list[str]:
    """What may follow `words` (the complete words) as the word `cur` being typed."""
    if not words:
        return [v for v in VERBS if v.startswith(cur)]
    verb = words[0]
    sub = shell.sub.choices.get(verb) if verb in VERBS else None
    if sub is None:
        return []
    options = _options(sub)
    prev = words[-1]
    if verb == "add" and prev in ("-t", "--type"):
        return [t for t in TARGETS if t.startswith(cur)]
    # daemon death and recovery: `--recovery MODE` or `--recovery=MODE`
    if verb == "add" and cur.startswith("--recovery="):
        return [f"--recovery={m}" for m in RECOVERY_MODES if f"--recovery={m}".startswith(cur)]
    if verb == "add" and prev == "--recovery":
        # the mode is optional: the next option is as good a completion as a mode
        return [m for m in RECOVERY_MODES if m.startswith(cur)] if not cur.startswith("-") else \
            sorted(o for o in options if o.startswith(cur))
    if prev in options and options[prev]:
        # the words the command table offers for it (commands.offer), as bash and zsh offer them
        words = _offered(sub).get(prev)
        return [w for w in words if w.startswith(cur)] if words else []  # -q 2, --size 1G: no guess
    if cur.startswith("-"):
        return sorted(o for o in options if o.startswith(cur))
    pos = _positionals(words[1:], options)
    if verb == "help":
        return [v for v in VERBS if v.startswith(cur)] if not pos else []
    if verb in ID_VERBS and (not pos or verb in MULTI_ID_VERBS):
        names = [devids.name(i) for i in shell.device_ids()]
        return [n for n in names if n.startswith(cur) and n not in pos]
    if verb in ACTIONS and pos:
        return rule_words(verb, cur)
    if verb == "lat" and len(pos) == 1:
        return [o for o in OPS if o.startswith(cur)]
    if verb == "trace":
        if cur.startswith("op="):
            return [f"op={o}" for o in OPS if f"op={o}".startswith(cur)]
        return [k for k in FILTER_KEYS if k.startswith(cur)]
    return []


class ShellCompleter(Completer):
    def __init__(self, shell):
        self.shell = shell
        self.paths = PathCompleter(expanduser=True)

    def get_completions(self, document, complete_event):
        text = document.text_before_cursor
        words = text.split()
        cur = "" if not text or text[-1].isspace() else words.pop()
        if len(words) >= 2 and words[0] == "add" and words[-1] in ("-f", "--file"):
            yield from self.paths.get_completions(Document(cur, len(cur)), complete_event)
            return
        for c in candidates(self.shell, words, cur):
            # a finished word gets its space, as in bash; `op=` waits for its value
            text = c if c.endswith("=") else c + " "
            yield Completion(text, start_position=-len(cur), display=c)
