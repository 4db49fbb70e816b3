"""Generation tokens/s: pp = 2 (2 ranks) vs one process, on the benchmark GPT.

    python benchmarks/bench_generate.py --rounds 3 [--prompts 8 --prompt-len 32 --new 96]

The benchmark GPT (jobs/configs/benchmark.toml: 8 blocks, d_model 256, 4 heads, seq 128, vocab
256) with random weights, saved once as an hpcpipe checkpoint; float32, one thread per rank.
Each run is `hpcpipe.train.generate.generate` in a fresh launch, timed after one untimed
warm-up call: greedy, M prompts (one micro-batch each) of --prompt-len random ids, --new new
tokens each; tokens/s = M x new / the seconds from the first prefill to the last token on
rank 0. Contenders, the order rotated each round: one process and pp = 2 with M prompts; both
with a single prompt (M = 1: nothing to overlap, so pp = 2 adds a hop per token and gains
nothing); and "2 processes": two independent 1-process runs at once, tokens/s summed, what two
busy processes get out of this machine at all (the ceiling for pp = 2). Every run's tokens must
equal one process's (greedy, float32: the pipeline splits layers, not arithmetic).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from anywhere without installing hpcpipe
CONFIG = ROOT / "jobs" / "configs" / "benchmark.toml"
TAG = "BENCH_JSON "


def save_checkpoint(root: str) -> None:
    """The benchmark model's random initial weights as an hpcpipe checkpoint under root."""
    import numpy as np
    from mpi4py import MPI

    from hpcpipe.config import load_config
    from hpcpipe.parallel.grid import Grid, Topology
    from hpcpipe.train import state
    from hpcpipe.train.trainer import PipelineTrainer, make_blueprint

    config = load_config(CONFIG, {"parallel.pp": "1", "checkpoint.dir": root})
    grid = Grid(MPI.COMM_SELF, Topology(1, 1, 1))
    tokens = np.arange(1 << 16) % config.model.vocab_size
    trainer = PipelineTrainer(config, grid, make_blueprint(config, 1), tokens=tokens)
    print(state.save(trainer, root))


def prompts(count: int, length: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (count, length), generator=g).tolist()


def worker(args) -> None:
    import torch
    from mpi4py import MPI

    from hpcpipe.train import generate as gen
    from hpcpipe.train import init_from

    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    config = init_from.build_config({}, {"parallel.pp": comm.Get_size()}, args.checkpoint)
    batch = prompts(args.prompts, args.prompt_len)
    gen.generate(config, comm, args.checkpoint, batch, 4)  # warm-up: allocator, first calls
    result = gen.generate(config, comm, args.checkpoint, batch, args.new)
    if comm.Get_rank() == 0:
        record = {"seconds": result.seconds, "tokens_per_s": result.tokens_per_s}
        print(TAG + json.dumps({**record, "tokens": result.tokens}), flush=True)


def launch(args, pp: int, count: int, copies: int = 1) -> dict:
    """One run (copies > 1: that many independent 1-process runs at once, tokens/s summed)."""
    from hpcpipe.launch import mpi_env, mpiexec_command

    cmd = [sys.executable, __file__, "--worker", "--checkpoint", args.checkpoint, "--prompts",
           str(count), "--prompt-len", str(args.prompt_len), "--new", str(args.new)]  # fmt: skip
    if pp > 1:
        cmd = mpiexec_command(pp) + cmd
    load = os.getloadavg()[0]
    procs = [
        subprocess.Popen(
            cmd, env=mpi_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )  # fmt: skip
        for _ in range(copies)
    ]
    records = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{out[-2000:]}{err[-2000:]}")
        line = next(x for x in out.splitlines() if x.startswith(TAG))
        records.append(json.loads(line[len(TAG) :]))
    rate = sum(r["tokens_per_s"] for r in records)
    return {**records[0], "tokens_per_s": rate, "copies": copies, "load_before": load}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=8, help="M: prompts generated together")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new", type=int, default=96, help="new tokens per prompt")
    parser.add_argument("--json", help="write every run here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--save", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.save:
        return save_checkpoint(args.save)
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as work:
        out = subprocess.run([sys.executable, __file__, "--save", work], capture_output=True,
                             text=True, check=True).stdout  # fmt: skip
        args.checkpoint = out.strip().splitlines()[-1]
        run_rounds(args)


def run_rounds(args) -> None:
    m = args.prompts
    contenders = [  # (name, pp, prompts, copies, the 1-process run it is compared with)
        ("1 process", 1, m, 1, "1 process"),
        ("pp=2", 2, m, 1, "1 process"),
        ("2 processes (ceiling)", 1, m, 2, "1 process"),
        ("1 process, M=1", 1, 1, 1, "1 process, M=1"),
        ("pp=2, M=1", 2, 1, 1, "1 process, M=1"),
    ]
    runs: dict[str, list[dict]] = {c[0]: [] for c in contenders}
    for r in range(args.rounds):
        order = contenders[r % len(contenders) :] + contenders[: r % len(contenders)]
        for name, pp, count, copies, _ in order:
            runs[name].append(launch(args, pp, count, copies))
            print(f"round {r + 1} {name:<22} {runs[name][-1]['tokens_per_s']:8.1f} tokens/s "
                  f"(load {runs[name][-1]['load_before']:.2f})", flush=True)  # fmt: skip
    for name, *_, base in contenders:  # greedy: every layout gives one process's tokens
        assert all(run["tokens"] == runs[base][0]["tokens"] for run in runs[name]), name
    print(f"\nbenchmark GPT, {args.prompt_len}-token prompts, {args.new} new tokens each, greedy, "
          f"float32; median of {args.rounds} rounds")  # fmt: skip
    print("| contender | prompts (M) | tokens/s | ratio to 1 process (median of rounds) |")
    print("|---|---|---|---|")
    for name, _, count, _, base in contenders:
        rate = statistics.median(x["tokens_per_s"] for x in runs[name])
        ratio = median_ratio(runs[name], runs[base])
        print(f"| {name} | {count} | {rate:,.0f} | {ratio:.2f} |")
    ceiling = median_ratio(runs["pp=2"], runs["2 processes (ceiling)"])
    print(f"pp=2 / 2 processes (how much of the machine's 2-process ceiling): {ceiling:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))


def median_ratio(runs: list[dict], base: list[dict]) -> float:
    pairs = zip(runs, base, strict=True)
    return statistics.median(a["tokens_per_s"] / b["tokens_per_s"] for a, b in pairs)


if __name__ == "__main__":
    main()
