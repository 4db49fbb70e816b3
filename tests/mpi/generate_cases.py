"""Generation on parallel layouts, under MPI (one launch of 4 ranks).

Usage: mpiexec -n 4 python -m mpi4py tests/mpi/generate_cases.py WORKDIR OUT.json
WORKDIR holds gpt2/ and llama/ (Hugging Face folders the test saved with transformers). In
order, for both families, greedy and seeded sampling, float64:
  1. pp=4 and pp=2 x tp=2 on all four ranks;
  2. pp=2 on ranks 0-1 and tp=2 on ranks 2-3 at the same time (two sub-communicators),
     greedy also without the key/value cache;
  3. the CLI on pp=2 x tp=2 (--format json), and its configuration errors on every rank.
Rank 0 writes {case: tokens} and every rank's CLI outcome to OUT.json.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import torch
from mpi4py import MPI

from hpcpipe.cli.main import main as cli_main
from hpcpipe.train import generate as gen
from hpcpipe.train import init_from

# the same prompts and sampling as tests/test_generate.py
PROMPTS = [[1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11, 12, 13]]
NEW = 8
SAMPLINGS = {"greedy": gen.Sampling(), "sampled": gen.Sampling(temperature=1.5, top_k=8, seed=3)}


def cli(argv: list[str]) -> dict:
    """Run `hpcpipe ARGV` in this process; its exit code and output."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli_main(argv)
    return {"rc": rc, "stdout": out.getvalue(), "stderr": err.getvalue()}


def tokens(comm, folder, pp, tp, sampling, kv_cache=True):
    overrides = {"train.dtype": "float64", "parallel.pp": pp, "parallel.tp": tp}
    config = init_from.build_config({}, overrides, folder)
    return gen.generate(config, comm, folder, PROMPTS, NEW, sampling, kv_cache).tokens


def main():
    torch.set_num_threads(1)
    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    work, out = Path(sys.argv[1]), sys.argv[2]
    half = world.Split(rank // 2, rank)
    got: dict = {}
    for family in ("gpt2", "llama"):
        folder = work / family
        for name, sampling in SAMPLINGS.items():
            got[f"{family}/{name}/pp4"] = tokens(world, folder, 4, 1, sampling)
            got[f"{family}/{name}/pp2tp2"] = tokens(world, folder, 2, 2, sampling)
            layout = ("pp2", 2, 1) if rank < 2 else ("tp2", 1, 2)
            got[f"{family}/{name}/{layout[0]}"] = tokens(half, folder, *layout[1:], sampling)
            if name == "greedy":
                recomputed = tokens(half, folder, *layout[1:], sampling, kv_cache=False)
                got[f"{family}/{name}/{layout[0]}/no-cache"] = recomputed
    half.Free()
    base = ["generate", "--checkpoint", str(work / "gpt2"), "--max-new-tokens", str(NEW),
            "--dtype", "float64"]  # fmt: skip
    prompts = [arg for p in PROMPTS for arg in ("--tokens", ",".join(map(str, p)))]
    runs = {
        "json": cli([*base, "--pp", "2", "--tp", "2", "--format", "json", *prompts]),
        "too_long": cli([*base, "--pp", "4", "--tokens", ",".join(["1"] * 30)]),
        "world": cli([*base, "--pp", "2", *prompts]),
    }
    gathered = world.gather((got, runs), root=0)
    if rank == 0:
        cases = {}
        for mine, _ in gathered:  # each case's tokens live on its group's first rank
            cases.update({k: v for k, v in mine.items() if v is not None})
        outcome = {name: [r[name] for _, r in gathered] for name in runs}
        Path(out).write_text(json.dumps({"tokens": cases, "cli": outcome}, indent=1))


if __name__ == "__main__":
    main()
