"""Fault-injection report: kill random ranks at random steps and actions; count what recovered.

    python benchmarks/fault_report.py --trials 6 [--seed 1]

Each trial trains the tiny float64 GPT on 4 ranks (pp = 4, checkpoint every step) under
`mpiexec --with-ft ulfm` with HPCPIPE_FAULT set to a random (rank, step, action) - an F, B,
SEND or RECV of that rank's schedule, a mid-checkpoint kill, or the step start. Outcomes:
  * in-job: the survivors recovered with ULFM and finished (exit 0);
  * restart: the job ended; jobs/local/resilient.sh-style relaunch on fewer ranks finished it;
  * then the final parameters are compared with a clean run resumed from the same checkpoint
    on the same smaller layout (relative difference <= 1e-10 counts as correct).
Prints one line per trial and a summary: recovered in-job / by restart, seconds to recover,
steps lost, and how many runs ended with wrong parameters.
"""

from __future__ import annotations

import argparse
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hpcpipe.checkpoint.store import full_tensors  # noqa: E402
from hpcpipe.launch import mpi_env, mpiexec_command  # noqa: E402
from hpcpipe.pipeline.schedule import build_schedule  # noqa: E402

STEPS = 5
ARGS = ["--model.n_layers=4", "--model.d_model=16", "--model.n_heads=2", "--model.seq_len=8",
        "--train.global_batch=8", "--microbatches", "4", "--dtype", "float64",
        "--steps", str(STEPS), "--checkpoint.at_end=true"]  # fmt: skip


def train(n: int, run_dir: Path, extra: list[str], env: dict, ulfm: bool):
    cmd = mpiexec_command(n, ["--with-ft", "ulfm"] if ulfm else []) + [
        sys.executable,
        "-m",
        "hpcpipe",
        "train",
        *ARGS,
        f"--checkpoint.dir={run_dir}",
        *extra,
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=mpi_env({**mpi_env(), **env}),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    return proc, time.perf_counter() - start


def random_fault(rng: random.Random) -> str:
    rank, step = rng.randrange(4), rng.randrange(2, STEPS + 1)
    actions = [str(a) for a in build_schedule("1f1b", 4, 4)[rank]] + ["ckpt", None]
    action = rng.choice(actions)
    return f"rank={rank},step={step}" + (f",action={action}" if action else "")


def final_params(run_dir: Path):
    return full_tensors(run_dir / f"step_{STEPS}", keep=lambda n: not n.startswith("optim."))[1]


def correct(run_dir: Path, step: int, pp: int, work: Path) -> bool:
    """Final parameters equal a clean resume from the same checkpoint on the same layout."""
    clean = work / "clean"
    clean.mkdir()
    (clean / f"step_{step}").symlink_to(run_dir / f"step_{step}", target_is_directory=True)
    (clean / "latest").write_text(f"step_{step}\n")
    proc, _ = train(pp, clean, ["--pp", str(pp), "--resume", "auto"], {}, ulfm=False)
    if proc.returncode:
        return False
    got, want = final_params(run_dir), final_params(clean)
    return got.keys() == want.keys() and all(
        float((got[k] - want[k]).norm() / want[k].norm()) <= 1e-10 for k in want
    )


def trial(fault: str, work: Path) -> dict:
    run_dir = work / "run"
    proc, wall = train(4, run_dir, ["--pp", "4", "--checkpoint.every=1"],
                       {"HPCPIPE_FAULT": fault}, ulfm=True)  # fmt: skip
    out = proc.stdout + proc.stderr
    how, pp = "in-job", 3
    if proc.returncode != 0:  # recovery in the job failed: relaunch on 3 ranks
        how = "restart"
        proc, wall2 = train(3, run_dir, ["--pp", "4", "--resume", "auto",
                                         "--parallel.elastic=true"], {}, ulfm=False)  # fmt: skip
        out += proc.stdout + proc.stderr
        wall += wall2
        if proc.returncode != 0:
            return {"fault": fault, "how": "failed", "wall": wall}
    killed = re.search(r"KILL at step (\d+)", out)
    resumed = re.findall(r"resumed from \S+/step_(\d+) at step", out)
    timed = re.findall(r"\(([\d.]+) s after the failure\)", out)
    step = int(resumed[-1]) if resumed else 0
    seconds = float(timed[-1]) if timed else None
    lost = (int(killed.group(1)) - 1 - step) if killed else 0
    ok = correct(run_dir, step, pp, work)
    return {"fault": fault, "how": how, "resumed_step": step, "steps_lost": lost,
            "recover_s": seconds, "wall": wall, "correct": ok}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    results = []
    for i in range(args.trials):
        fault = random_fault(rng)
        with tempfile.TemporaryDirectory() as tmp:
            r = trial(fault, Path(tmp))
        results.append(r)
        print(f"trial {i + 1}: HPCPIPE_FAULT={fault:<32} {r['how']:<8} resumed from step "
              f"{r.get('resumed_step')} lost {r.get('steps_lost')} step(s), recovery "
              f"{r.get('recover_s')} s, job {r['wall']:.0f} s, final params "
              f"{'correct' if r.get('correct') else 'WRONG'}", flush=True)  # fmt: skip
    in_job = sum(r["how"] == "in-job" for r in results)
    restart = sum(r["how"] == "restart" for r in results)
    wrong = sum(not r.get("correct") for r in results)
    secs = sorted(r["recover_s"] for r in results if r.get("recover_s") is not None)
    span = f"{secs[0]}-{secs[-1]} s" if secs else "-"
    lost = sorted(r.get("steps_lost") for r in results)
    print(f"{len(results)} kills: {in_job} recovered in-job (ULFM), {restart} by restart, "
          f"{len(results) - in_job - restart} not at all; recovery {span}; steps lost {lost}; "
          f"wrong final parameters: {wrong}")  # fmt: skip


if __name__ == "__main__":
    main()
