"""Pipeline equality on a GPU: representative layouts with train.device=cuda vs one process.

    mpiexec -n 2 python benchmarks/gpu_cases.py --group pp2 --device cuda --out pp2.json
    mpiexec -n 4 python benchmarks/gpu_cases.py --group tp2 --device cuda --out tp2.json

Run by benchmarks/gpu_check.sh. The cases, the model and the configs are the test suite's
(tests/mpi/pipeline_cases.py: `case_config`, `local_piece`, `local_params`, `rel`; the case
dicts from tests/pipeline_case_list.py's `case`); only the device differs: the built config
gets train.device (dataclasses.replace) and the trainer the device `pick_device` chooses (all
ranks of a node share GPU 0 when there is one GPU). The single-process oracle runs on the CPU
in float64 and every comparison is made on the CPU.

- float64 cases must equal the oracle to TOLERANCE (losses, gradients, norms, parameters).
- bfloat16 cases run the same case in bf16 and must track the float64 oracle's losses within
  BF16_LOSS_TOLERANCE (relative); their gradient and parameter differences are reported only,
  per tensor (the worst: `grad_rel`, `param_rel`) and over all of a rank's tensors together
  (`grad_rel_all`, `param_rel_all`).

Each case is guarded: an exception on a rank is recorded (the other ranks run into the short
parallel.timeout and record theirs) and the next case runs. Rank 0 rewrites --out after every
case, so a run cut short by its time box keeps what it finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for extra in (ROOT, ROOT / "tests", ROOT / "tests" / "mpi"):
    sys.path.insert(0, str(extra))  # run without installing; the suite's modules by import

import pipeline_cases as pc  # noqa: E402
import torch  # noqa: E402
from mpi4py import MPI  # noqa: E402
from pipeline_case_list import case as make_case  # noqa: E402

from hpcpipe import data  # noqa: E402
from hpcpipe.parallel.grid import Grid, Topology  # noqa: E402
from hpcpipe.train.serial import SerialTrainer  # noqa: E402
from hpcpipe.train.trainer import PipelineTrainer, make_blueprint, pick_device  # noqa: E402

TOLERANCE = 1e-10  # the suite's float64 tolerance (tests/test_pipeline_mpi.py)
BF16_LOSS_TOLERANCE = 1e-2
CASE_TIMEOUT = 20.0  # parallel.timeout per case: a failed peer costs this much, not 60 s


def _c(name, V, M, layout, tie=True, dtype="float64", arch="gpt2"):
    return make_case(name, V, M, False, layout, tie, dtype, arch)


# group -> (world size, cases). gpu_check.sh runs pp2, tp2 and dp2 on a GPU (worlds 2 and 4)
# and pp2, tp2-w2 and dp2-w2 in its CPU dry run (2 ranks).
GROUPS = {
    "pp2": (2, [
        _c("1f1b", 1, 4, (1, 2, 1)),
        _c("interleaved", 2, 4, (1, 2, 1)),
        _c("zb-h1", 1, 4, (1, 2, 1)),
        _c("1f1b", 1, 4, (1, 2, 1), tie=False, arch="llama"),
        _c("1f1b", 1, 4, (1, 2, 1), dtype="bfloat16"),
        _c("zb-h1", 1, 4, (1, 2, 1), tie=False, dtype="bfloat16", arch="llama"),
    ]),
    "tp2": (4, [
        _c("1f1b", 1, 3, (1, 2, 2)),
        _c("interleaved", 2, 4, (1, 2, 2), tie=False, arch="llama"),
        _c("1f1b", 1, 3, (1, 2, 2), dtype="bfloat16"),
    ]),
    "dp2": (4, [
        _c("1f1b", 1, 3, (2, 2, 1)),
        _c("zb-h1", 1, 3, (2, 2, 1), tie=False, arch="llama"),
        _c("1f1b", 1, 3, (2, 2, 1), dtype="bfloat16"),
    ]),
    # the CPU dry run's stand-ins for tp2 / dp2 on 2 ranks
    "tp2-w2": (2, [_c("1f1b", 1, 3, (1, 1, 2)), _c("1f1b", 1, 3, (1, 1, 2), dtype="bfloat16")]),
    "dp2-w2": (2, [_c("1f1b", 1, 3, (2, 1, 1)), _c("1f1b", 1, 3, (2, 1, 1), dtype="bfloat16")]),
}  # fmt: skip


def device_config(case: dict, device: str):
    """The suite's config for `case`, on `device`, with a short deadline for a dead peer."""
    config = pc.case_config(case)
    return dataclasses.replace(
        config,
        train=dataclasses.replace(config.train, device=device),
        parallel=dataclasses.replace(config.parallel, timeout=CASE_TIMEOUT),
    )


def grad_of(trainer, p: torch.Tensor) -> torch.Tensor:
    """The accumulated gradient: `.grad` (a bucket view in float32/64 runs), else the bucket's
    (16-bit runs keep their gradients in float32 buckets and drop `.grad`)."""
    if p.grad is not None:
        return p.grad
    return trainer.reducer.grad(p)


def on_cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float64)


class Total:
    """Relative difference over all of a rank's tensors together (the per-tensor maximum is
    dominated, in bf16, by tensors that start at zero such as biases)."""

    def __init__(self):
        self.diff = self.ref = 0.0

    def add(self, mine: torch.Tensor, ref: torch.Tensor) -> None:
        self.diff += float((mine - ref).square().sum())
        self.ref += float(ref.square().sum())

    def rel(self) -> float:
        return (self.diff / max(self.ref, 1e-300)) ** 0.5


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(comm, case: dict, device_kind: str, tokens) -> dict:
    """pipeline_cases.run_case on a device: STEPS steps both ways, this rank's worst differences
    (compared on the CPU in float64) and its peak device memory."""
    world = comm.Get_size()
    config = device_config(case, device_kind)
    oracle_case = {**case, "dtype": "float64"}  # the exact run, also for the bf16 cases
    oracle = SerialTrainer(pc.case_config(oracle_case), tokens=tokens)
    dp, pp, tp = case["layout"]
    grid = Grid(comm, Topology(dp, pp, tp))
    device = torch.device(pick_device(config, comm))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
    trainer = PipelineTrainer(config, grid, make_blueprint(config, world), device=str(device),
                              tokens=tokens)  # fmt: skip
    worst = {"loss": 0.0, "grad": 0.0, "param": 0.0, "norm": 0.0, "losses": []}
    worst["device"] = str(device)
    start = time.perf_counter()
    for _ in range(pc.STEPS):
        result = trainer.forward_backward()
        ref_loss = oracle.forward_backward()
        ref_grads = oracle.grads()
        total = Total()
        for name, p in pc.local_params(trainer):
            mine, ref = pc.local_piece(trainer, name, on_cpu(grad_of(trainer, p)), ref_grads[name])
            worst["grad"] = max(worst["grad"], pc.rel(mine, on_cpu(ref)))
            total.add(mine, on_cpu(ref))
        worst["grad_all"] = max(worst.get("grad_all", 0.0), total.rel())
        record = trainer.finish_step(result)
        ref_norm = oracle.finish_step()
        worst["losses"].append([record["loss"], ref_loss])
        worst["loss"] = max(worst["loss"], abs(record["loss"] - ref_loss) / abs(ref_loss))
        if record.get("grad_norm") is not None:
            norm_rel = abs(record["grad_norm"] - ref_norm) / ref_norm
            worst["norm"] = max(worst["norm"], norm_rel)
    sync(device)
    worst["seconds"] = time.perf_counter() - start
    ref_params = oracle.params()
    total = Total()
    for name, p in pc.local_params(trainer):
        mine, ref = pc.local_piece(trainer, name, on_cpu(p), ref_params[name])
        worst["param"] = max(worst["param"], pc.rel(mine, on_cpu(ref)))
        total.add(mine, on_cpu(ref))
    worst["param_all"] = total.rel()
    if device.type == "cuda":
        worst["max_memory_allocated"] = torch.cuda.max_memory_allocated(device)
    grid.free()
    return worst


def verdict(case: dict, r: dict) -> bool:
    """float64: equal to TOLERANCE everywhere; bf16: losses within BF16_LOSS_TOLERANCE."""
    if r.get("error"):
        return False
    if case["dtype"] == "float64":
        keys = ("loss_rel", "grad_rel", "norm_rel", "param_rel")
        return all(r[k] <= TOLERANCE for k in keys)
    return r["loss_rel"] <= BF16_LOSS_TOLERANCE  # NaN compares False: fails


def combine(case: dict, gathered: list[dict], group: str, world: int) -> dict:
    """One record of the case from every rank's worst differences."""
    errors = [f"rank {i}: {g['error']}" for i, g in enumerate(gathered) if g.get("error")]
    ok = [g for g in gathered if not g.get("error")]
    out = {**case, "group": group, "world": world, "error": "\n".join(errors)}
    if ok:
        out.update(
            loss_rel=max(g["loss"] for g in ok),
            grad_rel=max(g["grad"] for g in ok),
            norm_rel=max(g["norm"] for g in ok),
            param_rel=max(g["param"] for g in ok),
            grad_rel_all=max(g["grad_all"] for g in ok),
            param_rel_all=max(g["param_all"] for g in ok),
            seconds=max(g["seconds"] for g in ok),
            devices=[g.get("device") for g in gathered],
            max_memory_allocated=[g.get("max_memory_allocated") for g in gathered],
            losses=ok[0]["losses"],  # [pipeline, oracle] per step (rank 0's view: the same)
        )
    out["pass"] = verdict(case, out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group", choices=sorted(GROUPS), required=True)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", required=True, help="JSON file (rank 0), rewritten per case")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    world, cases = GROUPS[args.group]
    if comm.Get_size() != world:
        raise SystemExit(f"group {args.group} runs on {world} ranks, not {comm.Get_size()}")
    torch.set_num_threads(1)
    tokens = data.load_tokens(None, max_bytes=64 * 1024)
    results = []
    for case in cases:
        try:
            mine = run_case(comm, case, args.device, tokens)
        except Exception as exc:  # noqa: BLE001 - record it and go on to the next case
            mine = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"rank {comm.Get_rank()}: {pc_id(case)} failed:\n{traceback.format_exc()}",
                  file=sys.stderr, flush=True)  # fmt: skip
        gathered = comm.gather(mine, root=0)
        if comm.Get_rank() == 0:
            record = combine(case, gathered, args.group, world)
            results.append(record)
            Path(args.out).write_text(json.dumps(results, indent=1))
            print(summary_line(record), flush=True)


def pc_id(case: dict) -> str:
    from pipeline_case_list import case_id

    return f"{case_id(case)}-{case['dtype']}"


def summary_line(r: dict) -> str:
    status = "PASS" if r["pass"] else "FAIL"
    if r.get("error"):
        return f"  {status} {pc_id(r)}: {r['error'].splitlines()[0]}"
    return (
        f"  {status} {pc_id(r)}: loss {r['loss_rel']:.1e} grad {r['grad_rel']:.1e} "
        f"norm {r['norm_rel']:.1e} param {r['param_rel']:.1e} ({r['seconds']:.1f} s)"
    )


if __name__ == "__main__":
    main()
