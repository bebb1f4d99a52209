"""``python -m fuzz TARGET|all [--runs N] [--time S] [--seed N] [--jobs-dir DIR]``
and ``python -m fuzz TARGET --replay FILE...``.

Fuzzing reads the committed seeds (fuzz/corpus/TARGET) and regressions
(fuzz/regressions/TARGET) and writes what it learns to a work directory (default
fuzz/.work/TARGET, not committed), where a failing input is saved as ``crash-*`` (or
``timeout-*``). Coverage comes from atheris instrumenting emu's and the target's Python
bytecode as they are imported. libFuzzer ends the process when it is done, so ``all`` runs
each target in a child process, one after the other.
"""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
import time
from pathlib import Path

from fuzz import TARGETS
from fuzz.known import tolerant

HERE = Path(__file__).resolve().parent


def corpus_dirs(target: str) -> list[Path]:
    return [HERE / "corpus" / target, HERE / "regressions" / target]


def load(target: str):
    return importlib.import_module(f"fuzz.{target}")


def replay(target: str, files: list[str]) -> int:
    """Run inputs without atheris: 0 when every one passes, 1 otherwise."""
    mod = load(target)
    failed = 0
    for name in files:
        try:
            mod.one_input(Path(name).read_bytes())
        except Exception as e:  # report all, not just the first
            failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}", file=sys.stderr)
        else:
            print(f"ok   {name}")
    return 1 if failed else 0


def fuzz(target: str, args: argparse.Namespace) -> None:
    import atheris

    with atheris.instrument_imports(include=["emu", "fuzz"]):
        mod = load(target)
    one_input = mod.one_input if args.strict else tolerant(mod.one_input, target)
    work = Path(args.work_dir or HERE / ".work" / target)
    work.mkdir(parents=True, exist_ok=True)
    flags = [
        f"-max_len={getattr(mod, 'MAX_LEN', 4096)}",
        f"-timeout={args.timeout}",
        f"-artifact_prefix={work}/",
        "-print_final_stats=1",
    ]
    if args.runs is not None:
        flags.append(f"-runs={args.runs}")
    if args.time is not None:
        flags.append(f"-max_total_time={args.time}")
    if args.seed is not None:
        flags.append(f"-seed={args.seed}")
    dirs = [str(work / "corpus")] + [str(d) for d in corpus_dirs(target) if d.is_dir()]
    (work / "corpus").mkdir(exist_ok=True)
    atheris.Setup([sys.argv[0], *flags, *dirs], one_input)
    atheris.Fuzz()


def run_all(args: argparse.Namespace) -> int:
    """Each target in its own process; prints one summary line per target."""
    worst = 0
    for target in TARGETS:
        cmd = [sys.executable, "-m", "fuzz", target, "--timeout", str(args.timeout)]
        for opt in ("runs", "time", "seed"):
            if getattr(args, opt) is not None:
                cmd += [f"--{opt}", str(getattr(args, opt))]
        if args.strict:
            cmd.append("--strict")
        if args.work_dir:
            cmd += ["--work-dir", str(Path(args.work_dir) / target)]
        start = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent)
        took = time.monotonic() - start
        runs = re.findall(r"Done (\d+) runs", proc.stderr)
        print(f"{target}: exit {proc.returncode}, {runs[-1] if runs else '?'} runs, {took:.0f} s")
        if proc.returncode:
            worst = proc.returncode
            sys.stderr.write(proc.stderr[-4000:])
    return worst


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("target", choices=[*TARGETS, "all"])
    p.add_argument("--runs", type=int, help="stop after this many executions")
    p.add_argument("--time", type=int, help="stop after this many seconds")
    p.add_argument("--seed", type=int, help="libFuzzer's random seed (reproducible runs)")
    p.add_argument("--timeout", type=int, default=10, help="seconds one input may take")
    p.add_argument("--work-dir", help="new corpus entries and crash artifacts go here")
    p.add_argument("--strict", action="store_true", help="stop on known open defects too")
    p.add_argument("--replay", nargs="+", metavar="FILE", help="run these inputs and exit")
    args = p.parse_args()
    if args.target == "all":
        if args.replay:
            p.error("--replay needs one target")
        return run_all(args)
    if args.replay:
        return replay(args.target, args.replay)
    fuzz(args.target, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
