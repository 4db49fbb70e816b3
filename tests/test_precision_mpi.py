"""16-bit training under mpiexec: float16 loss scaling survives an overflow; bf16 with ZeRO."""

import json

from mpirun import run_mpi

TINY = ["--model.n_layers=2", "--model.d_model=32", "--model.n_heads=2", "--model.seq_len=16",
        "--train.global_batch=8", "--schedule.microbatches=2"]  # fmt: skip


def train(tmp_path, ranks, *flags):
    metrics = tmp_path / "metrics.jsonl"
    args = ["-m", "hpcpipe", "train", *TINY, *flags, "--metrics", str(metrics)]
    proc = run_mpi(ranks, args, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, [json.loads(line) for line in metrics.read_text().splitlines()]


def test_float16_overflow_skips_the_step_backs_off_and_training_goes_on(tmp_path):
    """debug.overflow_step=2 scales step 3's loss 2**24 times more: its fp16 gradients
    overflow on every rank, the step is skipped, the scale halves, the run continues."""
    flags = ["--pp", "2", "--steps", "8", "--train.dtype=float16",
             "--train.loss_scale_window=3", "--debug.overflow_step=2"]  # fmt: skip
    proc, records = train(tmp_path, 2, *flags)
    skipped = [r["step"] for r in records if r["skipped"]]
    assert skipped == [3]
    scales = [r["loss_scale"] for r in records]
    assert scales[:3] == [65536.0, 65536.0, 65536.0]  # steps 1-2 clean, 3 overflows
    assert scales[3] == 32768.0  # backed off after the overflow
    assert scales[6] == 65536.0  # three clean steps later it doubles again
    assert records[2]["grad_norm"] is None
    assert "grad_norm skipped (overflow)" in proc.stdout
    finite = [r["loss"] for r in records if not r["skipped"]]
    assert all(x == x for x in finite) and finite[-1] < finite[0]


def test_bf16_zero1_equals_zero0(tmp_path):
    """bf16 compute with fp32 masters sharded over dp=2 (ZeRO-1) gives the losses of the
    replicated optimizer exactly: with two replicas a reduce-scatter sums like an Allreduce,
    and AdamW on a shard is AdamW on those elements."""
    runs = {}
    for zero in (0, 1):
        (tmp_path / str(zero)).mkdir()
        _, records = train(tmp_path / str(zero), 4, "--dp", "2", "--pp", "2", "--steps", "4",
                           "--train.dtype=bfloat16", f"--parallel.zero={zero}")  # fmt: skip
        runs[zero] = [r["loss"] for r in records]
    assert runs[1] == runs[0]
    assert runs[0][-1] < runs[0][0]
