"""Peak memory per pipeline rank: hpcpipe vs torch.distributed.pipelining, same model and schedule.

Launcher (runs every schedule for both, one after the other, and prints the tables):
    python benchmarks/bench_memory.py --ranks 2 [--model llama] [--json mem.json]
Workers (started by the launcher; rank 0 prints one `BENCH_JSON [...]` line, a row per rank):
    mpiexec -n K python benchmarks/bench_memory.py --worker hpcpipe|torch --schedule 1f1b --ranks K

Both train bench_pipeline.py's model (its builders: the same stages, split, data, AdamW and
clipping) in float32 and are measured the same way, per rank:

* params, grads, optimizer: `hpcpipe.train.memory.measure_static` of the tensors held after a
  step (each storage once; AdamW's exp_avg and exp_avg_sq, not its scalar `step`). hpcpipe:
  `PipelineTrainer.memory_tensors()`; torch: the stage modules' parameters, their `.grad` and
  the optimizer's state.
* activations: the peak over the measured steps of a `SavedTensorMeter` (parameters, buffers
  and the token batch ignored): every tensor autograd saves in forward and the loss, plus what
  the pipeline keeps from a micro-batch's F until its B. hpcpipe's runtime feeds its meter
  itself (stage inputs and outputs). For torch the meter wraps `schedule.step`, and this script
  holds what torch's stage keeps: each `fwd_cache` entry (stage output and inputs) from
  `forward_one_chunk` until `backward_one_chunk` returns, the last stage's `output_chunks`
  (every micro-batch's output, kept for `return_outputs=True`, torch's default, until the next
  step clears them) and, for its moment, the merged output `step` returns.
* comm: receive buffers. hpcpipe: its p2p pool. torch: `PipelineStage` allocates one forward
  and one gradient receive buffer per micro-batch and stage (`args_recv_info`,
  `grad_recv_info`) and keeps them between steps. On CPU a received stage input is one of these
  buffers, so it counts in activations and comm both (hpcpipe's own total does the same).
* total: params + grads + optimizer + comm + activations (hpcpipe's measured total on CPU).
* RSS: `resource.getrusage` ru_maxrss of each process: before the model is built (Python,
  torch, MPI and the imports) and at the end (the peak, everything included).

Not counted for either: transient tensors of backward (gradients on their way), gloo's and
MPI's own buffers, the allocator's cached free memory.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench_pipeline (which puts the repository root on sys.path)

import bench_pipeline as bp  # noqa: E402

TAG = bp.TAG
SCHEDULES = ("1f1b", "gpipe", "interleaved")
# bench_pipeline's contender names for each schedule
HPCPIPE = {"1f1b": "hpcpipe", "gpipe": "hpcpipe-gpipe", "interleaved": "hpcpipe-interleaved"}
TORCH = {"1f1b": "torch", "gpipe": "torch-gpipe", "interleaved": "torch-interleaved"}
TORCH_CLASS = {"1f1b": "Schedule1F1B", "gpipe": "ScheduleGPipe",
               "interleaved": "ScheduleInterleaved1F1B"}  # fmt: skip
WARMUP = 1  # untimed steps before the measured ones (the first infers shapes, fills pools)
MIB = 2**20


def rss_bytes() -> int:
    """This process's peak resident set so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def runtime_imports() -> None:
    """What both workers load before building anything (MPI is initialised by mpi4py here)."""
    import torch  # noqa: F401
    import torch.distributed.pipelining  # noqa: F401
    from mpi4py import MPI  # noqa: F401

    import hpcpipe.train.trainer  # noqa: F401


def tensors_in(value) -> list:
    """The tensors of a stage output or input list (a tensor, a tuple or list, or None)."""
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in tensors_in(v)]
    return []


def row(static: dict, activations: int, held: int, rss_before: int) -> dict:
    parts = {k: static.get(k, 0) for k in ("params", "grads", "optimizer", "comm")}
    return {
        **parts,
        "activations": int(activations),
        "total": sum(parts.values()) + int(activations),
        "held_microbatches": held,
        "rss_before_model": rss_before,
        "rss_peak": rss_bytes(),
    }


# --- workers -----------------------------------------------------------------------------------


def worker_hpcpipe(args) -> list | None:
    """PipelineTrainer.train_step; the trainer's own meter and memory_tensors()."""
    runtime_imports()
    from mpi4py import MPI

    from hpcpipe.train import memory

    comm = MPI.COMM_WORLD
    rss_before = rss_bytes()
    trainer = bp.build_hpcpipe(HPCPIPE[args.schedule])
    activations = held = 0
    record_max = dict.fromkeys(memory.MEASURED_KEYS, 0)
    rss_steps = []  # ru_maxrss after each step (the warm-up's first)
    for i in range(WARMUP + args.steps):
        record = trainer.train_step()
        rss_steps.append(rss_bytes())
        if i >= WARMUP:
            activations = max(activations, trainer.memory.activations)
            held = max(held, record["peak_activations"])
            record_max = {k: max(v, record["memory"][k]) for k, v in record_max.items()}
    mine = row(memory.measure_static(trainer.memory_tensors()), activations, held, rss_before)
    predicted = trainer.predicted_memory()
    mine["predicted"] = {k: predicted[k] for k in memory.PREDICTED_KEYS}
    mine["predicted"]["peak_microbatches"] = predicted["peak_microbatches"]
    mine["record_memory_max_over_ranks"] = record_max  # what the metrics record carries
    mine["rss_after_each_step"] = rss_steps
    rows = comm.gather({"rank": comm.Get_rank(), **mine}, root=0)
    return rows if comm.Get_rank() == 0 else None


class TorchProbe:
    """Counts what torch's PipelineStages keep for backward in `meter` (see the docstring)."""

    def __init__(self, meter, t):
        self.meter, self.t = meter, t
        self.holds: dict[tuple[int, int], object] = {}
        self.peak_held = 0
        for stage in t.stages:
            self._wrap(stage)
        merge = t.schedule._merge_outputs

        def merged(chunks):
            out = merge(chunks)
            meter.hold(*tensors_in(out)).release()  # alive with output_chunks, for its moment
            return out

        t.schedule._merge_outputs = merged

    def _wrap(self, stage) -> None:
        forward, backward = stage.forward_one_chunk, stage.backward_one_chunk
        key = stage.stage_index

        def forward_one_chunk(chunk, *args, **kwargs):
            out = forward(chunk, *args, **kwargs)
            outputs, inputs = stage.fwd_cache[chunk]
            self.holds[(key, chunk)] = self.meter.hold(*tensors_in(outputs), *tensors_in(inputs))
            self.peak_held = max(self.peak_held, len(self.holds))
            return out

        def backward_one_chunk(chunk, *args, **kwargs):
            result = backward(chunk, *args, **kwargs)
            hold = self.holds.pop((key, chunk), None)
            if hold is not None:
                hold.release()
            return result

        stage.forward_one_chunk = forward_one_chunk
        stage.backward_one_chunk = backward_one_chunk
        stage.output_chunks = HeldList(self.meter)

    def kept_outputs(self) -> int:
        """Bytes the last stage's output_chunks keep now (between steps)."""
        from hpcpipe.train.memory import storage_bytes

        return storage_bytes(t for s in self.t.stages for t in tensors_in(list(s.output_chunks)))

    def recv_buffers(self) -> list:
        """Every receive buffer the rank's stages allocated (forward and gradient, per chunk)."""
        out = []
        for stage in self.t.stages:
            infos = [*stage.args_recv_info.values(), *stage.grad_recv_info.values()]
            for info in (i for group in infos for i in group):
                if not info.is_root_arg and info.buffer is not None:
                    out.append(info.buffer)
        return out


class HeldList(list):
    """torch's stage.output_chunks, each appended output counted until the list is cleared."""

    def __init__(self, meter):
        super().__init__()
        self.meter, self.holds = meter, []

    def append(self, value) -> None:
        self.holds.append(self.meter.hold(*tensors_in(value)))
        super().append(value)

    def clear(self) -> None:
        for hold in self.holds:
            hold.release()
        self.holds = []
        super().clear()


def worker_torch(args) -> list | None:
    """torch.distributed.pipelining (bench_pipeline.build_torch) under the same meter."""
    runtime_imports()
    import torch
    import torch.distributed as dist

    from hpcpipe.train.memory import SavedTensorMeter, measure_static

    rss_before = rss_bytes()
    t = bp.build_torch(TORCH[args.schedule], args.port)
    meter = SavedTensorMeter()
    meter.ignore(p for m in t.modules for p in m.parameters())
    meter.ignore(b for m in t.modules for b in m.buffers())
    probe = TorchProbe(meter, t)
    if args.no_return_outputs:  # output_chunks stay empty: the last stage keeps no outputs
        t.schedule.step = functools.partial(t.schedule.step, return_outputs=False)

    @contextlib.contextmanager
    def around(batch):
        if batch is not None:
            meter.ignore(batch)  # tokens and targets (torch's micro-batches are views of them)
        meter.reset()
        with meter:
            yield

    activations = held = kept = 0
    rss_steps = []
    for i in range(WARMUP + args.steps):
        probe.peak_held = 0
        t.step(around)
        rss_steps.append(rss_bytes())
        if i >= WARMUP:
            activations = max(activations, meter.peak)
            held = max(held, probe.peak_held)
            kept = max(kept, probe.kept_outputs())
    optimizer = [v for state in t.optimizer.state.values()
                 for k, v in state.items() if k != "step" and torch.is_tensor(v)]  # fmt: skip
    static = measure_static({
        "params": t.params, "grads": [p.grad for p in t.params], "optimizer": optimizer,
        "comm": probe.recv_buffers(),
    })  # fmt: skip
    mine = {"rank": t.rank, **row(static, activations, held, rss_before)}
    mine.update(kept_outputs=kept, rss_after_each_step=rss_steps)
    rows = [None] * t.k if t.rank == 0 else None
    dist.gather_object(mine, rows, dst=0)
    dist.destroy_process_group()
    return rows


WORKERS = {"hpcpipe": worker_hpcpipe, "torch": worker_torch}


# --- launcher ----------------------------------------------------------------------------------


def run_one(kind: str, schedule: str, args) -> list[dict]:
    """One mpiexec job; every rank's row. A failed job is run once more (its error printed)."""
    from hpcpipe.launch import mpi_env, mpiexec_command

    for attempt in range(2):
        cmd = mpiexec_command(args.ranks) + [sys.executable, str(Path(__file__).resolve())]
        cmd += ["--worker", kind, "--schedule", schedule, "--ranks", str(args.ranks)]
        cmd += ["--steps", str(args.steps), "--port", str(bp.free_port())]
        cmd += ["--no-return-outputs"] if args.no_return_outputs and kind == "torch" else []
        proc = subprocess.run(
            cmd, env=mpi_env(), capture_output=True, text=True, timeout=args.timeout, cwd=bp.ROOT
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(TAG)]
        if proc.returncode == 0 and lines:
            return sorted(json.loads(lines[-1][len(TAG) :]), key=lambda r: r["rank"])
        # NOTE: the first failing rank's traceback is often not the last thing on stderr.
        error = f"{kind} {schedule} failed (exit {proc.returncode}):\n{proc.stderr[:4000]}"
        if attempt == 0:
            print(f"# {error}\n# ...running it once more", flush=True)
    raise RuntimeError(error)


def mib(n: int) -> str:
    return f"{n / MIB:.2f}"


COLUMNS = ("params", "grads", "optimizer", "activations", "comm", "total")


def table(schedule: str, runs: dict[str, list[dict]], args) -> str:
    """A markdown table: a row per rank and implementation, MiB; notes below."""
    model = os.environ.get(bp.MODEL_ENV, "gpt2")
    virtual = f", V={bp.VIRTUAL}" if schedule == "interleaved" else ""
    lines = [
        f"**{model}, K = {args.ranks}, {schedule}{virtual}** (torch: `{TORCH_CLASS[schedule]}`"
        f"{', return_outputs=False' if args.no_return_outputs else ''}), "
        f"M = {bp.MICROBATCHES}, float32; MiB per rank:",
        "",
        "| rank | | params | grads | optimizer | activations (peak) | comm buffers | total "
        "| micro-batches held | RSS peak | RSS before model |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in range(args.ranks):
        for kind in ("hpcpipe", "torch"):
            x = runs[kind][r]
            cells = " | ".join(mib(x[c]) for c in COLUMNS)
            lines.append(
                f"| {r} | {kind} | {cells} | {x['held_microbatches']} | {mib(x['rss_peak'])} "
                f"| {mib(x['rss_before_model'])} |"
            )
    h = runs["hpcpipe"]
    record = h[0]["record_memory_max_over_ranks"]
    lines += [
        "",
        "hpcpipe predicted (predict_rank) activations / comm per rank: "
        + ", ".join(
            f"{mib(x['predicted']['activations'])} / {mib(x['predicted']['comm'])}" for x in h
        )  # fmt: skip
        + f"; metrics record `memory` (MAX over ranks): activations {mib(record['activations'])},"
        f" total {mib(record['total'])}.",
    ]
    kept = [x["kept_outputs"] for x in runs["torch"]]
    if any(kept):
        lines[-1] += (
            f" torch's last stage keeps {mib(max(kept))} MiB of outputs (`output_chunks`) "
            "between steps."
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="measured steps (after 1 warm-up)")
    parser.add_argument("--schedules", nargs="+", choices=SCHEDULES, default=list(SCHEDULES))
    parser.add_argument("--schedule", choices=SCHEDULES, default="1f1b", help="(worker)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per run")
    parser.add_argument("--worker", choices=sorted(WORKERS))
    parser.add_argument("--port", type=int, default=29500, help="gloo rendezvous (torch worker)")
    parser.add_argument("--model", choices=sorted(bp.MODELS), help="model family (default gpt2)")
    parser.add_argument("--json", help="also write every rank's record here")
    parser.add_argument(
        "--no-return-outputs", action="store_true",
        help="torch's schedule.step(..., return_outputs=False) (default: torch's default, True)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.model:
        os.environ[bp.MODEL_ENV] = args.model
    if args.worker:
        rows = WORKERS[args.worker](args)
        if rows is not None:
            print(TAG + json.dumps(rows), flush=True)
        return
    results = {}
    for schedule in args.schedules:
        runs = {}
        for kind in ("hpcpipe", "torch"):
            start = time.perf_counter()
            runs[kind] = run_one(kind, schedule, args)
            print(f"# {kind} {schedule}: {time.perf_counter() - start:.0f} s", flush=True)
        results[schedule] = runs
        print(table(schedule, runs, args) + "\n", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
