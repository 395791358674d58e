"""`make mutate`: mutation testing (mutmut 3) of the core modules, each against its own focused tests.

Why: a test suite that passes says nothing about the lines it never checks. mutmut changes one thing at a time in a
module (`<` to `<=`, a constant, a string, a dropped argument) and reruns the tests that reach the changed function;
a mutant no test fails on ("survived") is a behaviour nobody asserts. The target is >= 90% of each module's
non-equivalent mutants killed. docs/testing.md says how to read and fix survivors.

MODULES below is the one list: each module with the test files that must kill its mutants (a module listed among
its own tests contributes its doctests). Each module runs alone in mutants/<module>/ with its own mutmut config
(written there; the repository's pyproject.toml is not changed), so the test selection stays per module and the
folder is left for `mutmut results`, `mutmut show NAME` or `mutmut browse` run inside it. Every run starts
afresh: a cached "survived" would hide a test added since.

    python tests/mutate.py                        # every module in MODULES
    python tests/mutate.py classifiers/stats.py   # one (make mutate MODULES=classifiers/stats.py)

>>> slug("pipeline/slurm.py")
'pipeline.slurm'
>>> score(killed=95, total=100, equivalent=3)
0.979...
"""
from __future__ import annotations

import argparse
import ast
import difflib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.90
# The packages mutmut copies (only the module under test is mutated) and what the tests read besides tests/.
SOURCES = ["features", "classifiers", "pipeline"]
ALSO_COPY = ["data", "models", "Makefile"]
# In-process, fail fast, no cache or random order: mutmut itself adds -x -q and the test ids.
PYTEST_ARGS = ["-n", "0", "-p", "no:cacheprovider", "-p", "no:randomly"]

MODULES: dict[str, list[str]] = {
    "features/store.py": ["tests/test_store.py", "features/store.py"],
    "features/schema.py": ["tests/test_schema.py", "tests/test_store.py", "features/schema.py"],
    "features/update.py": ["tests/test_update.py"],
    "features/catalog.py": ["tests/test_catalog.py"],
    "pipeline/merge.py": ["tests/test_merge.py"],
    "classifiers/stats.py": ["tests/test_stats.py", "tests/test_mutants_stats.py"],
    "classifiers/saved.py": ["tests/test_saved.py", "tests/test_mutants_saved.py", "classifiers/saved.py"],
    "pipeline/slurm.py": ["tests/test_slurm.py", "tests/test_mutants_slurm.py"],
    "features/backbones.py": ["tests/test_backbones.py", "tests/test_data_configs.py",
                              "tests/test_mutants_backbones.py"],
}

# Survivors that cannot change behaviour, per module: (function, the mutated line as mutmut writes it, why). They
# are matched by content, not by mutant number, so an edit elsewhere in the function does not silently re-target
# them; an entry that matches no survivor is reported as stale. docs/testing.md lists the same with its reasons.
_SORT = 'order = order.sort_values(["_untied", "_loss", "fit_s"], {}) if table["tied"].sum() > 1 else order'
_STRICT = "strict() has already made every NaN and inf None: json.dumps never meets one, allow_nan=False only guards"
_LEXSORT = "pandas ignores `kind` when sorting by several columns (a lexsort, always stable)"
EQUIVALENT: dict[str, list[tuple[str, str, str]]] = {
    "classifiers/stats.py": [
        ("x__interval", 'if correct is None and not pd.isna(row.get("ci_low", None)):',
         "a missing ci_low column gives None instead of NaN; pd.isna is True for both"),
        ("x__interval", 'if correct is None and not pd.isna(row.get("ci_low", )):', "the same, get's default None"),
        ("x__interval", 'return fold_ci(row["accuracy"], row.get("accuracy_std", None), int(scheme[2:]))',
         "a missing accuracy_std gives None instead of NaN; fold_ci's pd.isna is True for both"),
        ("x__interval", 'return fold_ci(row["accuracy"], row.get("accuracy_std", ), int(scheme[2:]))',
         "the same, get's default None"),
        ("x_choose", 'table["tied"] = table["p_vs_top"].fillna(None) >= ALPHA',
         "fillna(None) leaves NaN, and NaN >= ALPHA is False, as 0 >= ALPHA is"),
        ("x_choose", _SORT.format("kind=None"), _LEXSORT),
        ("x_choose", _SORT.format(""), _LEXSORT),
        ("x_choose", _SORT.format('kind="XXstableXX"'), _LEXSORT),
        ("x_choose", _SORT.format('kind="STABLE"'), _LEXSORT),
        ("x_mcnemar_p", "if only_a - only_b == 0:",
         "when only_a == only_b > 0 the exact test's p is 1.0 (binomtest(k, 2k)), which the early return gives"),
        ("x_mcnemar_p", "return float(binomtest(min(only_a, only_b), only_a + only_b, ).pvalue)",
         "0.5 is binomtest's default p"),
    ],
    "classifiers/saved.py": [
        *[("x_dumps", f"return json.dumps(strict(obj), indent=2, {arg})", _STRICT)
          for arg in ("allow_nan=None", "", "allow_nan=True")],
        ("x_strict", "return [strict(v) for v in (value.tolist() if (isinstance(value, np.ndarray)) and False else "
                     "value)]", "iterating an array gives numpy scalars and sub-arrays, which strict turns into the "
                                "same Python values as tolist()"),
    ],
}


def slug(module: str) -> str:
    return module.removesuffix(".py").replace("/", ".")


def score(killed: int, total: int, equivalent: int) -> float:
    """Killed share of the mutants that can be killed at all."""
    return killed / (total - equivalent) if total > equivalent else 1.0


@dataclass
class Result:
    module: str
    seconds: float = 0.0
    status: dict[str, str] = field(default_factory=dict)  # mutant name -> mutmut's status word
    equivalent: dict[str, str] = field(default_factory=dict)  # mutant name -> reason
    stale: list[str] = field(default_factory=list)
    error: str = ""

    @property
    def killed(self) -> int:
        return sum(s in ("killed", "timeout") for s in self.status.values())

    @property
    def survivors(self) -> list[str]:
        return sorted(n for n, s in self.status.items() if s not in ("killed", "timeout") and n not in self.equivalent)

    @property
    def timeouts(self) -> int:
        return sum(s == "timeout" for s in self.status.values())

    @property
    def score(self) -> float:
        return score(self.killed, len(self.status), len(self.equivalent))

    def line(self) -> str:
        if self.error:
            return f"{self.module}: {self.error}"
        verdict = "ok" if self.score >= TARGET else f"below {TARGET:.0%}"
        return (f"{self.module}: {self.killed}/{len(self.status)} killed ({self.timeouts} by timeout), "
                f"{len(self.equivalent)} equivalent, "
                f"{len(self.survivors)} survived -> {self.score:.1%} ({verdict}), {self.seconds:.0f} s")


def config_toml(module: str, tests: list[str], pytest_args: list[str]) -> str:
    """The [tool.mutmut] section of one module's run (appended to a copy of pyproject.toml)."""
    def strings(items):
        return "[" + ", ".join(json.dumps(i) for i in items) + "]"

    return (f"\n[tool.mutmut]\nsource_paths = {strings(SOURCES)}\nonly_mutate = {strings([module])}\n"
            f"also_copy = {strings(ALSO_COPY)}\npytest_add_cli_args = {strings(pytest_args)}\n"
            f"pytest_add_cli_args_test_selection = {strings(tests)}\nuse_git_change_detection = false\n"
            # a fresh worker per mutant forked from a server that has imported, never run, TensorFlow: a child
            # forked after TensorFlow ran ops can spin in its thread pools until the CPU limit kills it
            'process_isolation = "forkserver"\n'
            # mutmut's limit is (the tests' own durations + constant) x multiplier; module fixtures (a classify run, a
            # tiny backbone) are not in those durations, and the 2 cores are shared: a tight limit turns slow
            # survivors into false "timeout" kills
            "timeout_constant = 10.0\ntimeout_multiplier = 10.0\n")


def prepare(module: str, tests: list[str], pytest_args: list[str]) -> Path:
    """A fresh mutants/<module>/: links to the sources and a pyproject.toml with this module's mutmut config."""
    work = ROOT / "mutants" / slug(module)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for name in [*SOURCES, *ALSO_COPY, "tests"]:
        (work / name).symlink_to(ROOT / name)
    pyproject = (ROOT / "pyproject.toml").read_text()
    if re.search(r"^\[tool\.mutmut\]", pyproject, re.M):
        raise SystemExit("pyproject.toml has a [tool.mutmut] section; tests/mutate.py writes one per module")
    (work / "pyproject.toml").write_text(pyproject + config_toml(module, tests, pytest_args))
    return work


def mutmut(work: Path, *args: str, log: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("mutmut")
    command = [str(exe) if exe.exists() else "mutmut", *args]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONDONTWRITEBYTECODE": "1"}
    with open(log, "w") as out:
        return subprocess.run(command, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)


def why_unrunnable(tests: list[str], pytest_args: list[str]) -> str:
    """mutmut stops when the selected tests fail without any mutant (and hides their output): show that run."""
    done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", *pytest_args, *tests], cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode == 0:
        return ""
    return f"the selected tests fail without any mutant; fix them first:\n{(done.stdout + done.stderr)[-2500:]}"


def statuses(work: Path, module: str) -> dict[str, str]:
    from mutmut.stats import status_by_exit_code

    meta = json.loads((work / "mutants" / f"{module}.meta").read_text())
    return {name: status_by_exit_code[code] for name, code in meta["exit_code_by_key"].items()}


def mutated_lines(work: Path, module: str) -> dict[str, list[str]]:
    """Mutant name -> the lines it changes, stripped, read from the mutated copy (every mutant there is a function
    beside the original `<function>__mutmut_orig`; `mutmut show NAME` prints the same as a diff, one process each)."""
    source = (work / "mutants" / module).read_text()
    functions = {node.name: node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.FunctionDef)}
    text = source.splitlines()

    def lines(name: str) -> list[str]:
        node = functions[name]
        return [line.replace(name, "_", 1).strip() for line in text[node.lineno - 1:node.end_lineno]]

    found = {}
    for name in functions:
        stem, _, number = name.rpartition("__mutmut_")
        if stem and number.isdigit() and stem + "__mutmut_orig" in functions:
            original = lines(stem + "__mutmut_orig")
            found[f"{slug(module)}.{name}"] = [line[2:] for line in difflib.ndiff(original, lines(name))
                                               if line.startswith("+ ")]
    return found


def run_module(module: str, jobs: int, deselect: list[str]) -> Result:
    result = Result(module)
    if not (ROOT / module).exists():
        result.error = "not present yet, skipped"
        return result
    tests = [t for t in MODULES[module] if (ROOT / t).exists()]
    missing = sorted(set(MODULES[module]) - set(tests))
    if missing:
        print(f"  {module}: no {', '.join(missing)} (yet); running the others", flush=True)
    pytest_args = PYTEST_ARGS + [arg for test in deselect for arg in ("--deselect", test)]
    work = prepare(module, tests, pytest_args)
    start = time.monotonic()
    done = mutmut(work, "run", "--max-children", str(jobs), log=work / "run.log")
    result.seconds = time.monotonic() - start
    if done.returncode:
        tail = (work / "run.log").read_text(errors="replace")[-1500:]
        result.error = (f"mutmut failed ({done.returncode}); see {work / 'run.log'}:\n{tail}\n"
                        f"{why_unrunnable(tests, pytest_args)}")
        return result
    result.status = statuses(work, module)
    wanted = {(func, text.strip()): why for func, text, why in EQUIVALENT.get(module, [])}
    matched, changed = set(), mutated_lines(work, module) if result.survivors else {}
    for name in result.survivors:
        func = name.rpartition(".")[2].partition("__mutmut_")[0]
        for line in changed.get(name, []):
            if (func, line) in wanted:
                result.equivalent[name] = wanted[func, line]
                matched.add((func, line))
                break
    result.stale = [f"{func}: {text}" for func, text in wanted if (func, text) not in matched]
    return result


def report(result: Result, work: Path) -> None:
    print(result.line(), flush=True)
    for entry in result.stale:
        print(f"    stale EQUIVALENT entry (no survivor matches): {entry}")
    changed = mutated_lines(work, result.module) if result.survivors else {}
    for name in result.survivors:
        lines = changed.get(name) or ["(see mutmut show " + name + ")"]
        print(f"    {result.status[name]} {name}: {lines[0]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help=f"modules to mutate (default: all of {', '.join(MODULES)})")
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("MUTATE_JOBS", "2")),
                        help="mutants tested at once (MUTATE_JOBS; default 2)")
    parser.add_argument("--deselect", action="append", default=[], metavar="NODEID",
                        help="leave out a test that fails for an unrelated reason (pytest's --deselect); say so "
                             "beside any number taken that way")
    args = parser.parse_args(argv)
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        parser.error(f"unknown module(s) {', '.join(unknown)}; expected one of: {', '.join(MODULES)} "
                     "(add a new one, with its tests, to MODULES in tests/mutate.py)")
    results = []
    for module in args.modules or list(MODULES):
        print(f"mutating {module} ...", flush=True)
        result = run_module(module, args.jobs, args.deselect)
        report(result, ROOT / "mutants" / slug(module))
        results.append(result)
    print("\nmodule | mutants | killed | equivalent | score | time")
    for r in results:
        if r.error:
            print(f"{r.module} | - | - | - | {r.error.splitlines()[0]} | -")
        else:
            print(f"{r.module} | {len(r.status)} | {r.killed} | {len(r.equivalent)} | {r.score:.1%} | {r.seconds:.0f} s")
    failed = [r for r in results if (r.error and "skipped" not in r.error) or (not r.error and r.score < TARGET)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
