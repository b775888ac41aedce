"""Mutation testing of ckptio: each mutant in ``mutants.py`` must make ``make test``'s tests fail.

    python tests/mutate.py              every mutant, two at a time (``make mutate``)
    python tests/mutate.py -k cache     mutants whose id contains "cache"
    python tests/mutate.py --list       the catalogue, nothing run
    python tests/mutate.py --full       each mutant against the whole suite (slow), not its named tests

Each worker copies the repository once; a mutant is applied to that copy (its ``before`` text must
occur exactly once, so a refactor that moves the code fails loudly here rather than testing
nothing), the mutant's tests run there with ``pytest -x``, and the file is restored. The copy comes
first on ``sys.path`` and on every child's ``PYTHONPATH``, so subprocesses (torchrun jobs, the CLI)
run the mutated code too; bytecode is never written, so a same-size edit within one second cannot
be served from a stale ``.pyc``. Before the mutants, the tests they name run once unmutated: a kill
means the mutation broke them, not that they were already broken.

killed: the tests failed (or could not even be collected); survived: they passed; timeout: they ran past ``--timeout`` (counted as
killed, and reported, since a mutant that hangs a test is caught by its time bound); error: pytest
could not run them (a bad test id, exit 5 for no tests), which fails the run.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from mutants import MUTANTS, Mutant

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IGNORED = (".venv", ".git", "__pycache__", ".pytest_cache", ".ruff_cache", "runs", "bench-out", "*.egg-info")


@dataclass
class Outcome:
    mutant: Mutant
    status: str  # killed, survived, timeout, error
    seconds: float
    detail: str = ""


def _env(workspace: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("CKPTIO_CACHE_DIR", None)  # each test process makes its own
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(workspace, "tests"), workspace])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def make_workspace() -> str:
    workspace = tempfile.mkdtemp(prefix="ckptio-mutate-")
    shutil.copytree(ROOT, workspace, ignore=shutil.ignore_patterns(*IGNORED), dirs_exist_ok=True)
    probe = subprocess.run(
        [sys.executable, "-c", "import ckptio, os; print(os.path.realpath(ckptio.__file__))"],
        cwd=workspace, env=_env(workspace), capture_output=True, text=True, check=True,
    )  # fmt: skip
    if not probe.stdout.strip().startswith(os.path.realpath(workspace)):
        raise SystemExit(f"the copy's ckptio is not the one imported there: {probe.stdout.strip()}")
    return workspace


def _pytest(workspace: str, tests: list[str], timeout: float, extra: list[str]) -> tuple[str, float, str]:
    """(status, seconds, first failing test or the error's tail) of one pytest run in ``workspace``."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra, *tests]
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=workspace, env=_env(workspace), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun agents and their ranks too
        proc.communicate()
        return "timeout", time.monotonic() - start, f"still running after {timeout:.0f}s"
    seconds = time.monotonic() - start
    if proc.returncode == 0:
        return "survived", seconds, ""
    if proc.returncode == 1:
        failed = [line.split(" ", 1)[1] for line in out.splitlines() if line.startswith(("FAILED ", "ERROR "))]
        return "killed", seconds, (failed[0] if failed else "")[:160]
    if proc.returncode in (2, 4) and "not found" not in out:  # the mutant broke collection (an import failed)
        return "killed", seconds, f"collection failed (pytest exit {proc.returncode})"
    return "error", seconds, f"pytest exit {proc.returncode}: {out[-1500:]}"


def run_mutant(workspace: str, mutant: Mutant, timeout: float, full: bool) -> Outcome:
    path = os.path.join(workspace, "ckptio", mutant.module)
    with open(path) as f:
        original = f.read()
    count = original.count(mutant.before)
    if count != 1:
        return Outcome(mutant, "error", 0.0, f"'before' text found {count} times in ckptio/{mutant.module}")
    with open(path, "w") as f:
        f.write(original.replace(mutant.before, mutant.after))
    try:
        tests = ["tests"] if full else list(mutant.tests)
        extra = ["-x", "-n", "auto" if full else "0"]
        status, seconds, detail = _pytest(workspace, tests, timeout, extra)
    finally:
        with open(path, "w") as f:
            f.write(original)
    return Outcome(mutant, status, seconds, detail)


def baseline(workspace: str, mutants: list[Mutant], timeout: float) -> None:
    """The named tests pass on the unmutated code (else a 'kill' would prove nothing)."""
    tests = sorted({t for m in mutants for t in m.tests})
    print(f"baseline: {len(tests)} test selections, unmutated ...", flush=True)
    status, seconds, detail = _pytest(workspace, tests, timeout * 4, ["-n", "auto"])
    if status != "survived":
        raise SystemExit(f"baseline {status} in {seconds:.0f}s: the named tests must pass unmutated\n{detail}")
    print(f"baseline: passed in {seconds:.0f}s", flush=True)


def report(outcomes: list[Outcome], minimum: float) -> int:
    by_module: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for o in outcomes:
        by_module[o.mutant.module][o.status] += 1
    print("\nmodule               mutants  killed  survived")
    for module in sorted(by_module):
        c = by_module[module]
        print(f"{module:<20} {sum(c.values()):>7} {c['killed'] + c['timeout']:>7} {c['survived']:>9}")
    killed = sum(o.status in ("killed", "timeout") for o in outcomes)
    errors = [o for o in outcomes if o.status == "error"]
    score = 100.0 * killed / max(len(outcomes), 1)
    print(f"\nscore: {killed}/{len(outcomes)} killed = {score:.1f}% (required: {minimum:.0f}%)")
    for o in outcomes:
        if o.status == "survived":
            why = f"equivalent: {o.mutant.equivalent}" if o.mutant.equivalent else "NOT argued equivalent"
            print(f"  survived {o.mutant.id}: {o.mutant.breaks} ({why})")
    for o in errors:
        print(f"  error {o.mutant.id}: {o.detail}")
    return 0 if score >= minimum and not errors else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", action="append", default=[], help="only mutants whose id contains this (repeatable)")
    parser.add_argument("-j", type=int, default=2, help="mutants run at once, each in its own copy (default 2)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per mutant before it counts as a hang")
    parser.add_argument("--full", action="store_true", help="run the whole suite against each mutant")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the named tests")
    parser.add_argument("--min-score", type=float, default=90.0)
    parser.add_argument("--json", help="write the outcomes here")
    parser.add_argument("--list", action="store_true", help="print the catalogue and exit")
    args = parser.parse_args(argv)

    ids = [m.id for m in MUTANTS]
    if len(set(ids)) != len(ids):
        raise SystemExit(f"duplicate mutant ids: {sorted(i for i in ids if ids.count(i) > 1)}")
    chosen = [m for m in MUTANTS if not args.k or any(k in m.id for k in args.k)]
    if args.list:
        for m in chosen:
            print(f"{m.id:<44} {m.breaks}")
        print(f"{len(chosen)} mutants over {len({m.module for m in chosen})} modules")
        return 0
    if not chosen:
        raise SystemExit("no mutant matches")

    workers = max(1, min(args.j, len(chosen)))
    workspaces: queue.Queue[str] = queue.Queue()
    made = [make_workspace() for _ in range(workers)]
    for w in made:
        workspaces.put(w)
    lock = threading.Lock()
    outcomes: list[Outcome] = []
    try:
        if not args.no_baseline and not args.full:
            baseline(made[0], chosen, args.timeout)

        def one(mutant: Mutant) -> Outcome:
            workspace = workspaces.get()
            try:
                outcome = run_mutant(workspace, mutant, args.timeout, args.full)
            finally:
                workspaces.put(workspace)
            with lock:
                outcomes.append(outcome)
                print(
                    f"[{len(outcomes):>3}/{len(chosen)}] {outcome.status:<8} {mutant.id:<44} "
                    f"{outcome.seconds:6.1f}s  {outcome.detail[:100] if outcome.status != 'error' else ''}",
                    flush=True,
                )
            return outcome

        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, chosen))
    finally:
        for w in made:
            shutil.rmtree(w, ignore_errors=True)
    outcomes.sort(key=lambda o: ids.index(o.mutant.id))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                [
                    {"id": o.mutant.id, "module": o.mutant.module, "status": o.status, "seconds": round(o.seconds, 1),
                     "detail": o.detail}
                    for o in outcomes
                ],
                f, indent=1,
            )  # fmt: skip
    return report(outcomes, args.min_score)


if __name__ == "__main__":
    sys.exit(main())
