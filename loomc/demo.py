"""``loomc demo``: an iterative code fixer on a simulated model, under a $1.00 budget.

The "model" fixes one failing test per call and now and then breaks something
that worked (``BestScore`` backtracks). Its calls are priced like a real
model's (input and output tokens), so the budget and the ledger are real;
no API key or network is needed. ``--crash-at N`` kills the process with
SIGKILL during step N, after the step's spend was charged; ``loomc resume``
finishes the run with that spend counted once.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
from decimal import Decimal
from typing import Any

import click

import loomc
from loomc import BestScore, Budget, Escalate, loop, predicate, score_plateau
from loomc.context import current_run
from loomc.errors import dollars, loomc_command

BUGGY = '''\
def mean(xs):
    return sum(xs) / (len(xs) + 1)

def clamp(x, lo, hi):
    return max(lo, min(x, lo))

def slugify(text):
    return text.lower().replace(" ", "_")

def is_palindrome(s):
    s = s.lower()
    return s == s[1:]
'''

# What the simulated model knows: the buggy line, and its fix.
FIXES = [
    ("    return sum(xs) / (len(xs) + 1)", "    return sum(xs) / len(xs)"),
    ("    return max(lo, min(x, lo))", "    return max(lo, min(x, hi))"),
    ('    return text.lower().replace(" ", "_")', '    return text.lower().replace(" ", "-")'),
    ("    return s == s[1:]", "    return s == s[::-1]"),
]

TESTS = [
    ("mean([2, 4])", 3.0),
    ("clamp(5, 0, 3)", 3),
    ("clamp(-1, 0, 3)", 0),
    ("slugify('Hello World')", "hello-world"),
    ("is_palindrome('Racecar')", True),
    ("is_palindrome('abc')", False),
]

# Priced like a mid-size model: $3 per million input tokens, $15 per million output tokens.
MODEL = "simulated-model"
INPUT_PER_TOKEN = Decimal(3) / 1_000_000
OUTPUT_PER_TOKEN = Decimal(15) / 1_000_000

_CRASH_AT: list[int] = []


def run_tests(code: str) -> float:
    """The fraction of TESTS that pass on ``code``."""
    namespace: dict[str, Any] = {}
    try:
        exec(compile(code, "<candidate>", "exec"), namespace)
    except Exception:
        return 0.0
    passed = 0
    for expr, expected in TESTS:
        try:
            passed += eval(expr, namespace) == expected
        except Exception:
            pass
    return passed / len(TESTS)


def simulated_model(code: str, attempt: int) -> tuple[str, str, int, int]:
    """A deterministic stand-in for an LLM: returns new code, a note, and token counts."""
    roll = int(hashlib.sha256(f"{code}|{attempt}".encode()).hexdigest(), 16)
    input_tokens = 6_000 + len(code) * 3 + roll % 900
    output_tokens = 900 + roll % 700
    broken = [(bad, good) for bad, good in FIXES if bad in code]
    fixed = [(bad, good) for bad, good in FIXES if good in code]
    if fixed and roll % 3 == 0:  # now and then the model "improves" a line that worked
        bad, good = fixed[roll % len(fixed)]
        return code.replace(good, bad), f"rewrote {good.strip()!r} (a regression)", input_tokens, output_tokens
    if not broken:
        return code, "nothing left to fix", input_tokens, output_tokens
    bad, good = broken[roll % len(broken)]
    return code.replace(bad, good), f"fixed {bad.strip()!r}", input_tokens, output_tokens


def score(state: dict[str, Any]) -> float:
    return run_tests(state["code"])


def all_tests_pass(history: loomc.History) -> bool:
    return (history[-1].score or 0) >= 1.0


def progress(step: loomc.Step) -> None:
    marks = "".join(f"  <- {e}" for e in step.events if e != "failed")
    note = step.state["note"] if step.ok else step.error
    score_text = "-" if step.score is None else f"{step.score:.2f}"
    click.echo(f"  step {step.n:>2}  {dollars(step.cost)}  tests passing {score_text:>4}  {note}{marks}")


@loop(budget=Budget(usd=1.00, iterations=25),
      converge_on=predicate(all_tests_pass) | score_plateau(patience=5, min_delta=0.0),
      backtrack=BestScore(), on_stall=Escalate(after=5), scorer=score, on_step=progress)
def fix_code(state: dict[str, Any]) -> dict[str, Any]:
    """One iteration of the fixer: ask the (simulated) model for a better version of the code."""
    attempt = state["attempt"] + 1
    # Seeded by the step number: deterministic (a resume replays the same calls), and a
    # backtracked state does not meet the same "model output" again.
    code, note, tokens_in, tokens_out = simulated_model(state["code"], loomc.step_number() or 0)
    loomc.charge(tokens_in * INPUT_PER_TOKEN + tokens_out * OUTPUT_PER_TOKEN, MODEL,  # paid: durable now
                 tokens=(tokens_in, tokens_out))
    if _CRASH_AT and loomc.step_number() == _CRASH_AT[0]:
        live = current_run()
        assert live is not None
        click.echo(f"  step {_CRASH_AT[0]:>2}  the process dies here (SIGKILL), after paying for the call; "
                   f"`{loomc_command('resume', live.id, db=live.store)}` finishes the run")
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return {"code": code, "attempt": attempt, "note": note}


def run_demo(db: str, crash_at: int | None = None) -> int:
    from loomc.cli import show_table
    from loomc.stores import sqlite_at

    store = sqlite_at(db)
    fix_code.store = store
    _CRASH_AT[:] = [] if crash_at is None else [crash_at]
    click.echo(f"loomc demo: fixing buggy code with a simulated model, under {fix_code.policy!r}")
    click.echo(f"checkpoints: {store.path}\n")
    run = fix_code.run({"code": BUGGY, "attempt": 0, "note": "the buggy original"})
    click.echo("")
    click.echo(show_table(store.get_run(run.id), store.load_steps(run.id, with_states=False), db=store))
    if crash_at is not None:
        click.echo(f"\nNo crash: the run ended after {len(run.history)} steps, before step {crash_at}; "
                   f"--crash-at {len(run.history) - 1} or less crashes it")
    click.echo(f"\nInspect it: {loomc_command('show', run.id, db=store)}")
    return 0 if run.status == "completed" else 2
