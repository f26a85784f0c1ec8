"""The fault verbs every face shares: one verb per action (`delay ID WORDS...`),
`faults ID` to list, `clear ID [RULE]`, `seed ID [N]`. Same contract as
ublkshell/verbs.py: run_X(args) -> JSON-able result, render_X(result) -> text."""
from ..devices import ids as devids
from ..errors import UsageError
from ..validate import ID, JSON, U32, U64, Arg, flag, fraction, whole, words
from . import grammar, table
from .powercut import render_powercut, run_powercut

GRAMMAR_HELP = """\
words (any order after the action's own values):
  q=N  tag N  op=read,write,...  lba A..B (512-byte sectors)  size=4k..64k  fua
  p=0.1 (probability; `seed` makes it replayable)  count=N (apply N times, then stop)
first matching rule wins; `faults ID` lists them with hits, `clear ID [RULE]` removes them.
The same lines can be written to /mnt/ublkstats/ublkbN/faults. Full grammar: docs/faults.md"""

EXAMPLES = {
    "delay": ["delay 0 5ms op=write", "delay 0 1ms..50ms p=0.1"],
    "fail": ["fail 0 tag 3 errno=EIO count=1", "fail 0 lba 2048..4095 op=read"],
    "drop": ["drop 0 op=write p=0.01"],
    "corrupt": ["corrupt 0 op=read lba 100 byte=17"],
    "torn": ["torn 0 sectors=8 count=1"],
    "hang": ["hang 0 tag 7"],
    "flakey": ["flakey 0 up=10s down=2s mode=error"],
    "badblocks": ["badblocks 0 100 2048..2055"],
}


def run_rule(action: str, a: dict) -> dict:
    dev_id = a["id"]
    line = " ".join([action, *a["words"]])
    try:
        rules = table.add(dev_id, line)
    except grammar.RuleError as e:
        # the user typed `ACTION ID WORDS`: count columns in that line
        col = e.col + (len(devids.name(dev_id)) + 1 if e.col > len(action) else 0)
        raise UsageError(f"{action}: column {col}: {e.reason}") from None
    return {"device": devids.name(dev_id), "added": [{"id": r["id"], "text": r["text"]} for r in rules]}


def render_rule(r: dict) -> str:
    return "\n".join(f"dev {r['device']}: rule #{x['id']} {x['text']}" for x in r["added"])


def run_faults(a: dict) -> dict:
    return faults_result(a["id"], table.rules(a["id"]))


def faults_result(dev_id: int, rules: dict) -> dict:
    """`faults ID --json` and the tree's faults.json (schema kind faults)."""
    return dict(rules, device=devids.name(dev_id), rules=[_json_rule(r) for r in rules["rules"]])


def _json_rule(r: dict) -> dict:
    # ranges are pairs: lists in JSON whichever face dumps them
    return {k: list(v) if isinstance(v, tuple) else v for k, v in r.items()}


def rules_table(r: dict) -> str:
    hung = f"; {r['hung']} IO withheld by hang" if r["hung"] else ""
    head = f"seed {r['seed']}{hung}"
    if not r["rules"]:
        return f"{head}\nno fault rules"
    lines = [head, f"{'ID':>4} {'HITS':>8}  RULE (first match wins)"]
    for x in r["rules"]:
        extra = []
        if "left" in x:
            extra.append(f"{x['left']} left")
        if "healed" in x:
            extra.append(f"{x['healed']} rewritten")
        if x.get("heal_lost"):
            # the tool cannot do exactly what it was told: say so where the rule is shown
            extra.append(f"{x['heal_lost']} rewrites not remembered: heal log full")
        lines.append(f"{x['id']:>4} {x['hits']:>8}  {x['text']}" + (f"  ({', '.join(extra)})" if extra else ""))
    return "\n".join(lines)


def render_faults(r: dict) -> str:
    return f"dev {r['device']}: " + rules_table(r)


def run_clear(a: dict) -> dict:
    n = table.clear(a["id"], a["rule"] or 0)
    return {"device": devids.name(a["id"]), "cleared": n, "rule": a["rule"]}


def render_clear(r: dict) -> str:
    if r["rule"] is not None:
        return f"dev {r['device']}: rule #{r['rule']} cleared"
    return f"dev {r['device']}: {r['cleared']} rule{'s' if r['cleared'] != 1 else ''} cleared"


def run_seed(a: dict) -> dict:
    if a["seed"] is not None:
        table.set_seed(a["id"], a["seed"])
    return {"device": devids.name(a["id"]), "seed": table.rules(a["id"])["seed"]}


def render_seed(r: dict) -> str:
    return f"dev {r['device']}: seed {r['seed']} (same seed + same IO = same choices)"


def add_parsers(sub) -> None:
    """The fault verbs' argparse subparsers (the CLI's, and through it the shell's)."""
    import argparse

    for action, what in grammar.ACTIONS.items():
        p = sub.add_parser(action, help=what, description=f"{action}: {what}.",
                           epilog="examples:\n  " + "\n  ".join(EXAMPLES[action]) + "\n\n" + GRAMMAR_HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("id", type=devids.arg, metavar="ID")
        p.add_argument("words", nargs="*", metavar="WORD", help="the rule's values and words (below)")
        p.add_argument("--json", action="store_true")
    f = sub.add_parser("faults", help="list a device's fault rules with their hits",
                       description="List a device's fault rules in match order, with hit counts and the seed.")
    f.add_argument("id", type=devids.arg, metavar="ID")
    f.add_argument("--json", action="store_true")
    c = sub.add_parser("clear", help="remove fault rules (all, or one by id)",
                       description="Remove every fault rule of a device, or one (`clear 0 3`). "
                                   "IOs withheld by a cleared hang complete within 20 ms.")
    c.add_argument("id", type=devids.arg, metavar="ID")
    c.add_argument("rule", type=int, nargs="?", metavar="RULE")
    c.add_argument("--json", action="store_true")
    s = sub.add_parser("seed", help="show or set the seed of fault probabilities",
                       description="Show, or set, the seed behind p= and random choices (delay ranges, "
                                   "corrupt offsets). Setting it restarts every queue's sequence: the same "
                                   "seed and the same IO give the same faults.")
    s.add_argument("id", type=devids.arg, metavar="ID")
    s.add_argument("seed", type=int, nargs="?", metavar="N")
    s.add_argument("--json", action="store_true")
    pc = sub.add_parser("powercut", help="lose power: forget unflushed writes, kill the daemon",
                        description="Cut the device's power: every write not yet made durable by a "
                                    "FLUSH or FUA is undone in the backing store (all of them, or a "
                                    "random subset with --partial/--keep), then the IO daemon dies "
                                    "without a word to the kernel. The device must have been added "
                                    "with --powercut. Mount again afterwards to see what a crash "
                                    "leaves: the journal replays, fsck should be clean.",
                        epilog="examples:\n  add -t loop -f disk.img --powercut\n  powercut 0\n"
                               "  powercut 0 --partial        each unflushed write survives with p=0.5\n"
                               "  seed 0 7; powercut 0 --keep 0.9",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    pc.add_argument("id", type=devids.arg, metavar="ID")
    pc.add_argument("--partial", action="store_true", help="keep each unflushed write with probability 0.5")
    pc.add_argument("--keep", type=float, metavar="P", help="keep each unflushed write with probability P")
    pc.add_argument("--json", action="store_true")


def _rule_verb(action: str):
    return (lambda a: run_rule(action, a)), render_rule, RULE_ARGS


RULE_ARGS = {**ID, "words": Arg("WORD", words(), ()), **JSON}
VERBS = {action: _rule_verb(action) for action in grammar.ACTIONS}
VERBS.update({
    "faults": (run_faults, render_faults, {**ID, **JSON}),
    "clear": (run_clear, render_clear, {**ID, "rule": Arg("RULE", whole(1, U32)), **JSON}),
    "seed": (run_seed, render_seed, {**ID, "seed": Arg("seed", whole(0, U64)), **JSON}),
    "powercut": (run_powercut, render_powercut,
                 {**ID, "partial": Arg("--partial", flag, False),
                  "keep": Arg("--keep", fraction(0.0, 1.0)), **JSON}),
})
