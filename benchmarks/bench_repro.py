"""Benchmark: the whole study from a fresh clone, timed stage by stage.

Clones the repository (committed HEAD, as CI and a new user get it) into --workdir with
../shared beside it, times `make install`, optionally applies a params overlay (e.g.
configs/real-samgan.yaml for the real-data mode), then runs `dvc repro` and stamps every
"Running stage" line DVC prints: a stage's time runs from its line to the next one (or the
end), so it includes the process start, imports and MLflow set-up. Last, a second
`dvc repro` with nothing to do (the no-op target). Prints a table, slowest first, and the
totals; --json writes them too.

    .venv/bin/python benchmarks/bench_repro.py --workdir /tmp/bench-repro [--overlay configs/real-samgan.yaml] [--json times.json] [STAGE ...]

With STAGE names (e.g. `evaluate`), only those and what they need are reproduced.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGE_LINE = re.compile(r"^Running stage '([^']+)'")


def timed(command: list[str], cwd: Path, env: dict[str, str]) -> float:
    began = time.perf_counter()
    subprocess.run(command, cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - began


def repro_stage_times(clone: Path, env: dict[str, str], log: Path, targets: list[str]) -> tuple[dict[str, float], float]:
    """(seconds per stage, total) of one `dvc repro [targets]`, its output copied to `log`."""
    marks: list[tuple[str, float]] = []
    began = time.perf_counter()
    with subprocess.Popen(["dvc", "repro", *targets], cwd=clone, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as process, log.open("w") as out:
        assert process.stdout is not None
        for line in process.stdout:
            out.write(line)
            found = STAGE_LINE.match(line)
            if found:
                marks.append((found.group(1), time.perf_counter()))
                print(f"  {marks[-1][1] - began:7.0f} s  {found.group(1)}", flush=True)
    ended = time.perf_counter()
    if process.returncode:
        raise SystemExit(f"dvc repro failed with code {process.returncode}; see {log}")
    times = {name: (marks[i + 1][1] if i + 1 < len(marks) else ended) - start for i, (name, start) in enumerate(marks)}
    return times, ended - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="an empty or missing folder (never an existing clone)")
    parser.add_argument("--overlay", help="params overlay applied before dvc repro (xctsam params apply)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("targets", nargs="*", help="stages to reproduce with what they need (default: all), e.g. evaluate")
    args = parser.parse_args()
    if args.workdir.exists() and any(args.workdir.iterdir()):
        raise SystemExit(f"{args.workdir}: not empty; give a new folder")
    args.workdir.mkdir(parents=True, exist_ok=True)
    clone = args.workdir / "main"
    shared = REPO.parent / "shared"
    if shared.exists():
        (args.workdir / "shared").symlink_to(shared.resolve())
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
    env = {**os.environ, "PATH": f"{clone / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("VIRTUAL_ENV", None)
    install = timed(["make", "install"], clone, env)
    print(f"make install: {install:.0f} s")
    if args.overlay:
        subprocess.run(["xctsam", "params", "apply", args.overlay], cwd=clone, env=env, check=True, stdout=subprocess.DEVNULL)
    stages, total = repro_stage_times(clone, env, args.workdir / "repro.log", args.targets)
    no_op = timed(["dvc", "repro", *args.targets], clone, env)
    print(f"\n{'stage':40s} {'seconds':>8s}")
    for name, seconds in sorted(stages.items(), key=lambda item: -item[1]):
        print(f"{name:40s} {seconds:8.0f}")
    print(f"\ndvc repro {total:.0f} s ({total / 60:.1f} min); with install {(total + install) / 60:.1f} min; no-op dvc repro {no_op:.1f} s")
    if args.json:
        args.json.write_text(json.dumps({"install_s": install, "repro_s": total, "no_op_s": no_op, "stages_s": stages, "overlay": args.overlay, "targets": args.targets, "python": sys.version.split()[0]}, indent=2))
    shutil.copy(clone / "dvc.lock", args.workdir / "dvc.lock")


if __name__ == "__main__":
    main()
