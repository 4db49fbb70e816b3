"""hpcpipe 1F1B vs torch.distributed.pipelining Schedule1F1B vs single-process training.

Launcher (runs everything, interleaved, and prints the table):
    python benchmarks/bench_pipeline.py --ranks 2 --rounds 5
Workers (started by the launcher; rank 0 prints one `BENCH_JSON {...}` line):
    mpiexec -n K python benchmarks/bench_pipeline.py --worker hpcpipe|torch --ranks K
    python benchmarks/bench_pipeline.py --worker serial

Every contender trains the same GPT (same layers, seed, data, AdamW, clipping, M micro-batches)
with one thread per process, and is timed over `--steps` optimizer steps after WARMUP_STEPS
untimed ones.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from anywhere without installing hpcpipe

MODELS = {
    "gpt2": {"n_layers": 8, "d_model": 256, "n_heads": 4, "seq_len": 128, "vocab_size": 256},
    # the same size as a Llama: GQA with 2 key/value heads, SwiGLU (Llama 3's rule: 768 hidden)
    "llama": {"arch": "llama", "n_layers": 8, "d_model": 256, "n_heads": 4, "n_kv_heads": 2,
              "seq_len": 128, "vocab_size": 256},
}  # fmt: skip
# NOTE: the launcher passes --model and --workload to its workers through the environment
# (mpiexec forwards it).
MODEL_ENV = "HPCPIPE_BENCH_MODEL"
WORKLOAD_ENV = "HPCPIPE_BENCH_WORKLOAD"
# --workload comm (issue 14): wide activations and one block per stage, so each stage sends
# d_model x seq_len floats per micro-batch for one block's work; n_layers is the pipeline's K,
# passed as "comm:K" (serial runs hold all K blocks in one process).
COMM_MODEL = {"n_layers": 2, "d_model": 1024, "n_heads": 8, "seq_len": 512, "vocab_size": 256}
COMM_GLOBAL_BATCH = 8  # micro-batches of one sequence: 2 MiB per message in float32
# --workload latency: the opposite end, a narrow block per stage (16 KiB messages, well under
# a millisecond of compute per micro-batch), so a step is mostly per-message and per-action
# cost: where a transport's latency (MPI's shared memory against gloo's TCP) can show on a CPU.
LATENCY_MODEL = {"n_layers": 2, "d_model": 64, "n_heads": 2, "seq_len": 64, "vocab_size": 256}
WORKLOAD_MODELS = {"comm": COMM_MODEL, "latency": LATENCY_MODEL}


def workload() -> tuple[str, int]:
    """("default" | "comm" | "latency", K) from the environment the launcher set."""
    name, _, k = os.environ.get(WORKLOAD_ENV, "default").partition(":")
    return name, int(k or 0)


def bench_model() -> dict:
    """The [model] table of the family chosen with --model (or the comm workload's)."""
    name, k = workload()
    if name in WORKLOAD_MODELS:
        return {**WORKLOAD_MODELS[name], "n_layers": k}
    return MODELS[os.environ.get(MODEL_ENV, "gpt2")]


def bench_train() -> dict:
    """The [train] table: the comm workload's batch is smaller (its blocks are 16x wider)."""
    if workload()[0] in WORKLOAD_MODELS:
        return {**TRAIN, "global_batch": COMM_GLOBAL_BATCH}
    return TRAIN


TRAIN = {"global_batch": 32, "steps": 100, "dtype": "float32", "threads": 1, "warmup_steps": 2}
MICROBATCHES = 8
TAG = "BENCH_JSON "
CONTENDERS = ("hpcpipe", "torch", "serial", "serial-xK")
# Issue 3's comparison: every hpcpipe schedule, every torch schedule, and the machine's ceiling.
SCHEDULE_CONTENDERS = ("hpcpipe-gpipe", "hpcpipe", "hpcpipe-interleaved", "hpcpipe-zb-h1",
                       "hpcpipe-zb-h2", "hpcpipe-zb-auto", "hpcpipe-zb-v",
                       "hpcpipe-interleaved-zb", "torch", "torch-interleaved", "torch-zb",
                       "torch-zbv", "hpcpipe-2bw", "serial", "serial-xK")  # fmt: skip
HPCPIPE_SCHEDULES = {"hpcpipe": "1f1b", "hpcpipe-gpipe": "gpipe",
                     "hpcpipe-interleaved": "interleaved", "hpcpipe-zb-h1": "zb-h1",
                     "hpcpipe-zb-h2": "zb-h2", "hpcpipe-zb-auto": "zb-auto", "hpcpipe-zb-v": "zb-v",
                     "hpcpipe-interleaved-zb": "interleaved-zb", "hpcpipe-2bw": "2bw"}  # fmt: skip
VIRTUAL = 2  # chunks per rank for the interleaved schedules


def bench_config(ranks: int, schedule: str = "1f1b"):
    """The benchmark model as an hpcpipe Config for `ranks` pipeline stages."""
    from hpcpipe.config import build_config

    virtual = VIRTUAL if schedule.startswith("interleaved") or schedule == "zb-v" else 1
    return build_config(
        {
            "model": bench_model(),
            "train": bench_train(),
            "parallel": {"pp": ranks},
            # zb-auto with twice 1F1B's memory: the Zero Bubble paper's ZB-2p
            "schedule": {
                "name": schedule,
                "microbatches": MICROBATCHES,
                "virtual": virtual,
                "memory_limit": 2.0 if schedule == "zb-auto" else 1.0,
            },  # fmt: skip
        }
    )


def tokens_per_step() -> int:
    return bench_train()["global_batch"] * bench_model()["seq_len"]


# Untimed steps first: the first step infers shapes and fills the allocator, and the next still
# faults in fresh memory (tens of MB here at 0.3-2 ms/MB): every contender's first timed step
# ran 5-20 % slow with only one.
WARMUP_STEPS = 2


def time_steps(step, steps: int) -> list[float]:
    """WARMUP_STEPS untimed calls (shapes, allocator, caches), then `steps` timed calls."""
    for _ in range(WARMUP_STEPS):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def summary(times: list[float], **extra) -> dict:
    """tokens/s over all timed steps (each step ends synchronised across ranks)."""
    return {
        "tokens_per_s": tokens_per_step() * len(times) / sum(times),
        "step_times": times,
        **extra,
    }


# --- workers -----------------------------------------------------------------------------------


def worker_serial(args) -> dict:
    """Whole model in one process, M micro-batches accumulated per step."""
    import torch

    from hpcpipe import data
    from hpcpipe.train.serial import SerialTrainer

    torch.set_num_threads(1)
    trainer = SerialTrainer(bench_config(1), tokens=data.load_tokens(None))

    def step():
        trainer.forward_backward()
        trainer.finish_step()

    return summary(time_steps(step, args.steps))


def worker_serial_k(args) -> dict | None:
    """K independent serial trainings at once: what K cores of this machine deliver together.

    NOTE: no communication at all, so (this / (K x serial)) is the efficiency ceiling that
    shared caches, memory bandwidth and the hypervisor leave to any K-rank pipeline.
    """
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    comm.Barrier()  # start the timed work together so the processes overlap throughout
    rates = comm.gather(worker_serial(args)["tokens_per_s"], root=0)
    return {"tokens_per_s": sum(rates), "per_process": rates} if comm.Get_rank() == 0 else None


def build_hpcpipe(kind: str):
    """hpcpipe's PipelineTrainer (the schedule of contender `kind`) on every rank of COMM_WORLD."""
    import torch
    from mpi4py import MPI

    from hpcpipe import data
    from hpcpipe.parallel.grid import Grid, Topology
    from hpcpipe.train.trainer import PipelineTrainer, make_blueprint

    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    k = comm.Get_size()
    config = bench_config(k, HPCPIPE_SCHEDULES[kind])
    grid = Grid(comm, Topology(dp=1, pp=k, tp=1))
    return PipelineTrainer(config, grid, make_blueprint(config, k), tokens=data.load_tokens(None))


def worker_hpcpipe(args) -> dict | None:
    """hpcpipe's PipelineTrainer (args.schedule) on every rank of COMM_WORLD."""
    from mpi4py import MPI

    from hpcpipe.train.loop import fits_zb_auto, fitted_step

    comm = MPI.COMM_WORLD
    trainer = build_hpcpipe(args.worker)
    records = []
    fitting = [fits_zb_auto(trainer.config)]  # zb-auto: its first (warm-up) step fits costs

    def step() -> None:
        if fitting[0]:
            fitting[0] = False
            records.append(fitted_step(trainer, lambda message: None))
        else:
            records.append(trainer.train_step())

    # train_step ends in an Allreduce, so every rank leaves each step together.
    times = time_steps(step, args.steps)
    measured = records[WARMUP_STEPS:]
    result = summary(
        times,
        bubble=statistics.mean(r["bubble"] for r in measured),
        own_tokens_per_s=statistics.median(r["tokens_per_s"] for r in measured),
    )
    return result if comm.Get_rank() == 0 else None


def mpi_rank_size() -> tuple[int, int]:
    """Rank and size from the launcher's environment (Open MPI, MPICH/Hydra, Slurm)."""
    for rank_key, size_key in (
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
        ("PMI_RANK", "PMI_SIZE"),
        ("SLURM_PROCID", "SLURM_NTASKS"),
    ):
        if rank_key in os.environ:
            return int(os.environ[rank_key]), int(os.environ[size_key])
    return 0, 1


# torch's single-stage schedules (one stage per rank): contender -> class name.
TORCH_SINGLE = {"torch": "Schedule1F1B", "torch-gpipe": "ScheduleGPipe"}
# torch's multi-stage schedules: (class name, placement of the 2K stages on K ranks).
TORCH_MULTI = {
    "torch-interleaved": ("ScheduleInterleaved1F1B", "loop"),
    "torch-zb": ("ScheduleInterleavedZeroBubble", "loop"),
    "torch-zbv": ("ScheduleZBVZeroBubble", "v"),
}


def torch_stage_ids(placement: str, rank: int, k: int, n: int) -> list[int]:
    """Stages of `rank`: loop (Megatron: r, r+K, ...) or v (r and 2K-1-r, as torch's ZBV)."""
    if placement == "v":
        return [rank, n - 1 - rank]
    return list(range(rank, n, k))


def build_torch(kind: str, port: int) -> SimpleNamespace:
    """torch.distributed.pipelining over gloo on hpcpipe's own Stage modules: the schedule of
    contender `kind` (1F1B, GPipe, or V chunks per rank: interleaved 1F1B, interleaved
    zero-bubble, ZB-V). Returns the pieces and step(around=None); `around(batch)`, if given,
    is a context manager entered around schedule.step (the memory benchmark's meter)."""
    import torch
    import torch.distributed as dist
    from torch.distributed import pipelining

    from hpcpipe import data
    from hpcpipe.models.api import build_stage
    from hpcpipe.train import optim
    from hpcpipe.train.trainer import make_blueprint

    torch.set_num_threads(1)
    rank, k = mpi_rank_size()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=k)
    multi = TORCH_MULTI.get(kind)
    config = bench_config(k, "interleaved" if multi else "1f1b")
    blueprint = make_blueprint(config, k)  # the same balanced split hpcpipe uses
    n, loss_fn = blueprint.num_stages, blueprint.spec.loss
    ids = torch_stage_ids(multi[1], rank, k, n) if multi else [rank]
    modules = [
        build_stage(blueprint.spec, config.model, blueprint.partition.layers(s), config.train.seed)
        for s in ids
    ]
    stages = [pipelining.PipelineStage(m, s, n, torch.device("cpu"))
              for m, s in zip(modules, ids, strict=True)]  # fmt: skip
    # scale_grads=True divides by M: the same loss/M accumulation as hpcpipe and SerialTrainer.
    if multi:
        schedule = getattr(pipelining, multi[0])(stages, MICROBATCHES, loss_fn=loss_fn)
    else:
        schedule = getattr(pipelining, TORCH_SINGLE[kind])(stages[0], MICROBATCHES, loss_fn=loss_fn)
    params = [p for m in modules for p in m.parameters()]
    named = [kv for m in modules for kv in m.named_parameters()]
    optimizer = optim.make_adamw(named, config.train)
    first, last = 0 in ids, n - 1 in ids
    batches = batch_source(config, data) if first or last else None
    state = {"step": 0}

    def step(around=None):
        for p in params:
            p.grad = None
        batch = next(batches) if batches else None
        with around(batch) if around else contextlib.nullcontext():
            run_schedule(schedule, first, last, batch)
        clip_and_step(params, optimizer, config.train, state["step"])
        state["step"] += 1

    return SimpleNamespace(
        rank=rank, k=k, ids=ids, modules=modules, stages=stages, schedule=schedule,
        params=params, optimizer=optimizer, step=step,
    )  # fmt: skip


def worker_torch(args) -> dict | None:
    """torch.distributed.pipelining over gloo (see build_torch), timed."""
    import torch.distributed as dist

    t = build_torch(args.worker, args.port)
    result = summary(time_steps(t.step, args.steps))
    dist.destroy_process_group()
    return result if t.rank == 0 else None


def batch_source(config, data):
    """Global batches from the same sampler (seed) hpcpipe uses."""
    tokens = data.load_tokens(None)
    t = config.train
    held = data.holdout_windows(len(tokens), config.model.seq_len, config.data.val_fraction)
    sampler = data.Sampler(len(tokens), config.model.seq_len, t.global_batch, t.seed, held)
    while True:
        yield data.make_batch(tokens, sampler.next_starts(), config.model.seq_len)


def run_schedule(schedule, first: bool, last: bool, batch) -> None:
    """The rank with the first stage feeds tokens, the one with the last the targets."""
    inputs = (batch[0],) if first else ()
    if last:
        schedule.step(*inputs, target=batch[1], losses=[])
    else:
        schedule.step(*inputs)


def clip_and_step(params, optimizer, train, step_index: int) -> None:
    """Global-norm clipping across stages and AdamW: the work hpcpipe's finish_step does."""
    import torch
    import torch.distributed as dist

    from hpcpipe.train import optim

    # NOTE: this all_reduce also ends each step with every rank in sync, like hpcpipe's.
    total = torch.tensor([optim.grad_square_sum(params)], dtype=torch.float64)
    dist.all_reduce(total)
    optim.scale_grads(params, optim.clip_coefficient(float(total) ** 0.5, train.grad_clip))
    optim.set_lr(optimizer, optim.lr_at(step_index, train))
    optimizer.step()


WORKERS = {
    "serial": worker_serial,
    "serial-xK": worker_serial_k,
    **dict.fromkeys(HPCPIPE_SCHEDULES, worker_hpcpipe),
    **dict.fromkeys(TORCH_SINGLE, worker_torch),
    **dict.fromkeys(TORCH_MULTI, worker_torch),
}


# --- launcher ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(kind: str, ranks: int, steps: int) -> list[str]:
    """The command line of one contender's run."""
    from hpcpipe.launch import mpiexec_command

    script = [sys.executable, str(Path(__file__).resolve()), "--worker", kind]
    script += ["--steps", str(steps), "--ranks", str(ranks), "--port", str(free_port())]
    return script if kind == "serial" else mpiexec_command(ranks) + script


def run_one(kind: str, ranks: int, steps: int, timeout: float) -> dict:
    """Launch one contender; return rank 0's JSON record plus the CPU load of other processes."""
    from hpcpipe.launch import mpi_env

    with ForeignLoad() as load:
        proc = subprocess.run(
            command(kind, ranks, steps),
            env=mpi_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
        )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(TAG)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{kind} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return {**json.loads(lines[-1][len(TAG) :]), "foreign_cores": load.cores}


def busy_jiffies() -> int:
    """CPU time (all cores, clock ticks) the whole machine has spent busy since boot."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4]  # minus idle and iowait


def children_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class ForeignLoad:
    """Average cores used by processes other than our run, while it ran.

    NOTE: the machine is shared with other work; a run that lost a core to someone else is
    not comparable, so every run reports how much it lost.
    """

    def __enter__(self):
        self.start = (time.perf_counter(), busy_jiffies(), children_seconds())
        return self

    def __exit__(self, *exc):
        wall, busy, ours = (b - a for a, b in zip(self.start, self._now(), strict=True))
        self.cores = max(0.0, (busy / os.sysconf("SC_CLK_TCK") - ours) / wall)

    def _now(self):
        return time.perf_counter(), busy_jiffies(), children_seconds()


def wait_for_quiet(limit: float, threshold: float = 0.3) -> float:
    """Wait (at most `limit` s) until other processes use < `threshold` cores; return the load."""
    deadline = time.monotonic() + limit
    while True:
        with ForeignLoad() as load:
            time.sleep(1.0)
        if load.cores < threshold or time.monotonic() > deadline:
            return load.cores


def run_rounds(args, contenders=CONTENDERS) -> dict[str, list[dict]]:
    """Rounds of all contenders, the order rotated each round so none always runs first."""
    runs: dict[str, list[dict]] = {kind: [] for kind in contenders}
    for r in range(args.rounds):
        n = len(contenders)
        for kind in contenders[r % n :] + contenders[: r % n]:
            runs[kind].append(run_clean(kind, args, f"round {r + 1}/{args.rounds}"))
    return runs


def run_clean(kind: str, args, label: str) -> dict:
    """One run, repeated (at most --retries times) while other processes stole > 0.3 cores."""
    for attempt in range(args.retries + 1):
        wait_for_quiet(args.quiet_wait)
        record = run_one(kind, args.ranks, args.steps, args.timeout)
        clean = record["foreign_cores"] < 0.3
        note = (
            "" if clean else ", discarded" if attempt < args.retries else ", kept: out of retries"
        )
        print(
            f"{label} {kind:>19}: {record['tokens_per_s']:7,.0f} tok/s"
            f"   (other processes used {record['foreign_cores']:.2f} cores{note})",
            flush=True,
        )
        if clean:
            break
    return record


def medians(runs: dict[str, list[dict]], key: str = "tokens_per_s") -> dict[str, float]:
    return {kind: statistics.median(r[key] for r in rs) for kind, rs in runs.items() if rs}


def report(runs: dict[str, list[dict]], k: int) -> str:
    """The results table: medians over rounds, then the derived ratios."""
    med = medians(runs)
    cores = os.cpu_count() or 1
    rows = [
        f"K={k} ranks on {cores} cores{' (OVERSUBSCRIBED)' if k > cores else ''}, "
        f"M={MICROBATCHES}, {len(runs['serial'])} rounds; median tokens/s (min-max over rounds):"
    ]
    for kind in CONTENDERS:
        values = [r["tokens_per_s"] for r in runs[kind]]
        rows.append(f"  {kind:<24} {med[kind]:8,.0f}   ({min(values):,.0f}-{max(values):,.0f})")
    return "\n".join(rows + derived(runs, med, k))


def paired(runs: dict[str, list[dict]], kind: str, base: str, scale: float = 1.0) -> float:
    """Median over rounds of kind / (scale x base) within each round.

    NOTE: this machine's speed drifts by 10-20 % over minutes (a VM) even when no other process
    runs; a ratio of two runs of the same round, minutes apart at most, cancels most of that,
    which a ratio of medians over all rounds does not.
    """
    pairs = zip(runs[kind], runs[base], strict=True)
    return statistics.median(a["tokens_per_s"] / (scale * b["tokens_per_s"]) for a, b in pairs)


def derived(runs: dict[str, list[dict]], med: dict[str, float], k: int) -> list[str]:
    """Ratio, efficiencies against K x serial and against the concurrent ceiling, bubble."""
    ideal, ceiling = k * med["serial"], med["serial-xK"]
    bubble = statistics.median(r["bubble"] for r in runs["hpcpipe"])
    foreign = statistics.median(r["foreign_cores"] for rs in runs.values() for r in rs)
    return [
        f"  hpcpipe / torch          {med['hpcpipe'] / med['torch']:8.3f}   "
        f"(median of per-round ratios {paired(runs, 'hpcpipe', 'torch'):.3f})",
        f"  efficiency hpcpipe       {med['hpcpipe'] / ideal:8.3f}   = tok/s / ({k} x serial) "
        f"(median of per-round ratios {paired(runs, 'hpcpipe', 'serial', k):.3f})",
        f"  efficiency torch         {med['torch'] / ideal:8.3f}   "
        f"(median of per-round ratios {paired(runs, 'torch', 'serial', k):.3f})",
        f"  ceiling serial-xK        {ceiling / ideal:8.3f}   = {k} independent serial runs at "
        f"once / ({k} x serial)",
        f"  hpcpipe vs ceiling       {med['hpcpipe'] / ceiling:8.3f}   torch vs ceiling "
        f"{med['torch'] / ceiling:.3f}",
        f"  hpcpipe measured bubble  {bubble:8.3f}   (1F1B ideal (K-1)/(M+K-1) = "
        f"{(k - 1) / (MICROBATCHES + k - 1):.3f})",
        f"  other processes' load    {foreign:8.2f}   cores (median over runs)",
    ]


def schedule_report(runs: dict[str, list[dict]], k: int) -> str:
    """Issue 3's table: every schedule, its efficiency and bubble; best hpcpipe vs best torch."""
    med = medians(runs)
    ideal = k * med["serial"]
    rounds = len(runs["serial"])
    rows = [
        f"K={k}, M={MICROBATCHES}, V={VIRTUAL} for interleaved, {rounds} rounds; median "
        "tokens/s, efficiency = tok/s / (K x serial accumulated) from the medians and as the "
        "median of per-round ratios, measured bubble:"
    ]
    kinds = list(runs)  # SCHEDULE_CONTENDERS, or the --contenders chosen
    for kind in kinds:
        bubble = (
            medians({kind: runs[kind]}, "bubble").get(kind) if "bubble" in runs[kind][0] else None
        )
        extra = f"   measured bubble {bubble:.3f}" if bubble is not None else ""
        per_round = paired(runs, kind, "serial", k)
        rows.append(
            f"  {kind:<22} {med[kind]:8,.0f}   efficiency {med[kind] / ideal:.3f} "
            f"(per round {per_round:.3f}){extra}"
        )
    ours = max((k2 for k2 in kinds if k2.startswith("hpcpipe")), key=med.get)
    theirs = max((k2 for k2 in kinds if k2.startswith("torch")), key=med.get)
    ceiling = max((k2 for k2 in kinds if k2.startswith("hpcpipe")), key=lambda k2: paired(
        runs, k2, "serial-xK"))  # fmt: skip
    rows.append(
        f"  best hpcpipe per round vs that round's serial-xK ({ceiling}): "
        f"{paired(runs, ceiling, 'serial-xK'):.3f} (median of per-round ratios)"
    )
    if "hpcpipe-2bw" in runs and "hpcpipe" in runs:
        rows.append(
            f"  2bw / 1f1b = {med['hpcpipe-2bw'] / med['hpcpipe']:.3f} (median of per-round "
            f"ratios {paired(runs, 'hpcpipe-2bw', 'hpcpipe'):.3f}): no flush, staleness 1"
        )
    rows.append(
        f"  best hpcpipe ({ours}) / best torch ({theirs}) = {med[ours] / med[theirs]:.3f} "
        f"(median of per-round ratios {paired(runs, ours, theirs):.3f})"
    )
    # No pipeline can beat K processes that never communicate: that bounds any ratio to torch.
    rows.append(
        f"  ceiling: serial-xK / best torch = {med['serial-xK'] / med[theirs]:.3f} (the most "
        "any schedule could reach on this machine)"
    )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per run")
    parser.add_argument(
        "--quiet-wait", type=float, default=60.0, help="max s to wait for an idle machine per run"
    )
    parser.add_argument("--retries", type=int, default=2, help="reruns of a disturbed run")
    parser.add_argument("--worker", choices=sorted(WORKERS))
    parser.add_argument("--port", type=int, default=29500, help="gloo rendezvous (torch worker)")
    parser.add_argument("--json", help="also write every run's record here")
    parser.add_argument("--model", choices=sorted(MODELS), help="model family (default gpt2)")
    parser.add_argument(
        "--schedules", action="store_true",
        help="compare every hpcpipe schedule with every torch schedule (1F1B, interleaved 1F1B, "
    "interleaved zero-bubble, ZB-V) instead",
    )  # fmt: skip
    parser.add_argument(
        "--workload", choices=("default", "comm", "latency"), default="default",
        help="comm: d_model 1024, seq 512, one block per stage, one sequence per micro-batch "
        "(communication-heavy); latency: the same with d_model 64, seq 64 (per-message cost); "
        "1F1B contenders only",
    )  # fmt: skip
    parser.add_argument(
        "--contenders", nargs="+", choices=SCHEDULE_CONTENDERS,
        help="with --schedules: only these (serial, serial-xK and one torch contender needed)",
    )  # fmt: skip
    args = parser.parse_args()
    needed = {"serial", "serial-xK"}
    if args.contenders and (not needed <= set(args.contenders) or not any(
            c.startswith("torch") for c in args.contenders)):  # fmt: skip
        parser.error("--contenders must include serial, serial-xK and a torch contender")
    if args.model:
        os.environ[MODEL_ENV] = args.model
    if args.workload != "default" and not args.worker:
        if args.schedules:
            parser.error(f"--workload {args.workload} compares 1F1B contenders: drop --schedules")
        os.environ[WORKLOAD_ENV] = f"{args.workload}:{args.ranks}"
    if args.worker:
        result = WORKERS[args.worker](args)
        if result is not None:
            print(TAG + json.dumps(result), flush=True)
        return
    if args.schedules:
        runs = run_rounds(args, tuple(args.contenders or SCHEDULE_CONTENDERS))
        print(schedule_report(runs, args.ranks))
    else:
        runs = run_rounds(args)
        print(report(runs, args.ranks))
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
