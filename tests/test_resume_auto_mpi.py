"""`--resume auto` on 2 ranks (pp=2): every rank checks what it loads and the ranks agree.

A byte flipped in a shard file that only pipeline rank 1 reads is noticed there, and every rank
steps back to the older checkpoint; when no checkpoint loads, the run starts at step 0 on fresh
weights. Losses are compared exactly (float64, same layout) with an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch
from mpirun import run_mpi

from hpcpipe.checkpoint import format as fmt
from hpcpipe.checkpoint import manifest
from hpcpipe.checkpoint import store as ck
from hpcpipe.checkpoint.format import CheckpointError, Shard

TINY = ["--model.n_layers=2", "--model.d_model=16", "--model.n_heads=2", "--model.seq_len=8",
        "--train.global_batch=4", "--schedule.microbatches=2", "--dtype", "float64",
        "--parallel.timeout=60", "--pp", "2"]  # fmt: skip
STEPS = 6  # checkpoints at steps 2, 4 and 6


def train(run_dir, metrics, *extra):
    """`hpcpipe train` on 2 ranks; (output, {step: loss}). Never waits past 180 s."""
    args = ["-m", "hpcpipe", "train", *TINY, f"--checkpoint.dir={run_dir}"]
    proc = run_mpi(2, [*args, "--metrics", str(metrics), *extra], timeout=180)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return output, {r["step"]: r["loss"] for r in rows}


def flip_a_byte(step_dir, file_name: str, tensor: str | None = None) -> str:
    """Flip one byte in the data of `tensor` (default: the biggest) of one shard file."""
    manifest = json.loads((step_dir / "manifest.json").read_text())
    pieces = [(name, p) for name, e in manifest["tensors"].items() for p in e["pieces"]]
    name, piece = max(
        ((n, p) for n, p in pieces if p["file"] == file_name and tensor in (None, n)),
        key=lambda item: math.prod(item[1]["shape"]),
    )
    with open(step_dir / file_name, "r+b") as f:
        f.seek(piece["byte_offset"] + 3)
        byte = f.read(1)
        f.seek(piece["byte_offset"] + 3)
        f.write(bytes([byte[0] ^ 0x10]))
    return name


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of STEPS steps checkpointing every 2 (its losses and its folder)."""
    work = tmp_path_factory.mktemp("resume_auto")
    run_dir = work / "run"
    _, losses = train(run_dir, work / "ref.jsonl", "--steps", str(STEPS), "--checkpoint.every=2")
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert [p.name for p in sorted(run_dir.glob("step_*"))] == ["step_2", "step_4", "step_6"]
    return work, run_dir, losses


def test_a_corrupt_piece_only_pp1_reads_steps_every_rank_back(reference):
    work, original, ref = reference
    run_dir = work / "one_bad"
    shutil.copytree(original, run_dir)
    # pp=2, tp=1: rank 0 reads only pp0_tp0.h5 (rank 1 reads it too, for the tied embedding)
    flip_a_byte(run_dir / "step_6", "pp1_tp0.h5")
    output, losses = train(run_dir, work / "one_bad.jsonl", "--steps", str(STEPS),
                           "--resume", "auto")  # fmt: skip
    warnings = [line for line in output.splitlines() if "warning: skipping checkpoint" in line]
    assert len(warnings) == 1, output[-4000:]
    assert f"{run_dir / 'step_6'}: rank 1: CheckpointError" in warnings[0]
    assert "pp1_tp0.h5" in warnings[0] and "checksum mismatch" in warnings[0]
    assert "rank 0" not in warnings[0]  # rank 0 alone would have resumed from step 6
    assert f"resumed from {run_dir / 'step_4'} at step 4" in output
    assert losses == {s: ref[s] for s in (5, 6)}  # exactly: float64, same layout


def test_no_checkpoint_loads_starts_at_step_0_on_fresh_weights(reference):
    work, original, ref = reference
    run_dir = work / "all_bad"
    shutil.copytree(original, run_dir)
    flip_a_byte(run_dir / "step_6", "pp1_tp0.h5")  # rank 0 loads step 6 into its parameters
    # a weight of stage 0 that only rank 0 reads: rank 1 loads step 4 into its parameters
    flip_a_byte(run_dir / "step_4", "pp0_tp0.h5", "layers.1.mlp.fc.weight")
    (run_dir / "step_2" / "manifest.json").write_text('{"format": "hpcpipe-che')  # torn
    output, losses = train(run_dir, work / "all_bad.jsonl", "--steps", "3", "--resume", "auto")
    warnings = [line for line in output.splitlines() if "warning: skipping checkpoint" in line]
    assert [w.split(":")[2].strip().split()[-1] for w in warnings] == [
        str(run_dir / s) for s in ("step_6", "step_4", "step_2")
    ], output[-4000:]
    assert "rank 1: CheckpointError" in warnings[0] and "checksum mismatch" in warnings[0]
    assert "rank 0: CheckpointError" in warnings[1] and "layers.1.mlp.fc.weight" in warnings[1]
    assert "ranks 0, 1: CheckpointError" in warnings[2] and "unreadable manifest" in warnings[2]
    assert "starting at step 0 with freshly initialised weights" in output
    assert "resumed from" not in output
    assert losses == {s: ref[s] for s in (1, 2, 3)}  # exactly a fresh run's


def test_an_explicit_path_that_fails_ends_the_job_naming_the_rank(reference):
    work, original, _ = reference
    run_dir = work / "explicit"
    shutil.copytree(original, run_dir)
    (run_dir / "step_6" / "pp1_tp0.h5").unlink()  # only rank 1 reads it
    args = ["-m", "hpcpipe", "train", *TINY, f"--checkpoint.dir={run_dir}", "--steps", "8"]
    proc = run_mpi(2, [*args, "--resume", str(run_dir / "step_6")], timeout=180)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-4000:]
    assert f"cannot resume from {run_dir / 'step_6'}: rank 1: CheckpointError" in output
    assert "pp1_tp0.h5: shard file missing" in output and "step     7" not in output


# ---------------------------------------------------------------- one process, no mpiexec


def _save_two_pieces(root, step: int, full: torch.Tensor) -> None:
    """`full` saved as two row blocks in two files, as two pipeline ranks would."""
    half = full.shape[0] // 2
    shards = [
        (f"pp{i}_tp0", Shard("w", block.contiguous(), tuple(full.shape), (half * i, 0)))
        for i, block in enumerate(full.split([half, full.shape[0] - half]))
    ]
    tmp = root / f".tmp_step_{step}"
    tmp.mkdir(parents=True)
    records = [r for pos, shard in shards for r in fmt.write_shard_file(tmp, pos, [shard])]
    manifest.write_json(tmp / ck.MANIFEST, manifest.build_manifest({}, step, records))
    os.replace(tmp, root / f"step_{step}")


def test_committed_steps_are_newest_first_and_read_no_shard(tmp_path):
    root = tmp_path / "run"
    for step in (1, 3, 10):
        _save_two_pieces(root, step, torch.zeros(4, 2))
    (root / ".tmp_step_11").mkdir()  # a save in progress is not committed
    for shard in (root / "step_10").glob("*.h5"):
        shard.unlink()  # listing does not look inside: the resume finds out, on its ranks
    assert ck.committed_steps(root) == [(s, root / f"step_{s}") for s in (10, 3, 1)]
    assert ck.committed_steps(tmp_path / "nothing") == []


def test_a_manifest_that_misplaces_pieces_is_refused_by_the_load(tmp_path):
    full = torch.arange(48, dtype=torch.float64).reshape(8, 6)
    _save_two_pieces(tmp_path, 1, full)
    step_dir = tmp_path / "step_1"
    saved = json.loads((step_dir / ck.MANIFEST).read_text())
    # rows 3..6 instead of 4..7: 4 + 4 rows still "fill" 8, but row 7 would stay unwritten
    saved["tensors"]["w"]["pieces"][1]["offsets"] = [3, 0]
    (step_dir / ck.MANIFEST).write_text(json.dumps(saved))
    with pytest.raises(CheckpointError, match=r"w: saved pieces .* overlap"):
        ck.load_checkpoint(step_dir, [("w", (8, 6), (0, 0), (8, 6))])


def test_a_checkpoint_of_another_model_is_refused_not_started_over(reference):
    """A sound checkpoint that does not fit (another n_layers) is not "corrupt": starting at
    step 0 would let the next saves prune it. The job ends, naming the mismatch; nothing is lost."""
    work, original, _ = reference
    run_dir = work / "other_model"
    shutil.copytree(original, run_dir)
    args = ["-m", "hpcpipe", "train", *TINY, f"--checkpoint.dir={run_dir}", "--steps", "8",
            "--checkpoint.every=2", "--resume", "auto", "--model.n_layers=3"]  # fmt: skip
    proc = run_mpi(2, args, timeout=180)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "does not fit this run's model" in output and "refusing to start over" in output
    assert [p.name for p in sorted(run_dir.glob("step_*"))] == ["step_2", "step_4", "step_6"]
    assert ck.verify(run_dir / "step_6") == []
