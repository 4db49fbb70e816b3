"""Sharded checkpoints on one process (MPI.COMM_SELF): round trips, resharding, corruption, CLI."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os

import h5py
import numpy as np
import pytest
import torch
from mpi4py import MPI

from hpcpipe.checkpoint import checksum, manifest
from hpcpipe.checkpoint import format as fmt
from hpcpipe.checkpoint import store as ck
from hpcpipe.checkpoint.format import CheckpointError, Shard
from hpcpipe.cli.ckpt import add_ckpt_parser

COMM = MPI.COMM_SELF


def whole(name: str, tensor: torch.Tensor) -> Shard:
    """An unsharded tensor."""
    return Shard(name, tensor, tuple(tensor.shape), (0,) * tensor.dim())


def model_tensors() -> dict[str, torch.Tensor]:
    """One tensor per stored dtype, a scalar, and names with '/' and '%'."""
    g = torch.Generator().manual_seed(0)
    return {
        "layers.0.attn.qkv.weight": torch.randn(6, 4, generator=g, dtype=torch.float64),
        "layers.0.mlp.fc.weight": torch.randn(5, 3, generator=g),
        "layers.1.ln.weight": torch.randn(7, generator=g).to(torch.bfloat16),
        "embed.positions": torch.randint(-(2**40), 2**40, (3, 2), generator=g),
        "optim.exp_avg/layers.0.attn.qkv.weight": torch.randn(6, 4, generator=g),
        "optim.step": torch.tensor(17, dtype=torch.int64),
        "odd%2Fname": torch.arange(3, dtype=torch.float32),
    }


def save(root, step, tensors, keep=3, manifest=None):
    """Save every tensor whole from this one rank."""
    shards = [whole(n, t) for n, t in tensors.items()]
    meta = manifest if manifest is not None else {"config": {"model": {"d_model": 4}}}
    return ck.save_checkpoint(root, step, COMM, shards, True, "pp0_tp0", meta, keep=keep)


def wanted_whole(tensors):
    return [(n, tuple(t.shape), (0,) * t.dim(), tuple(t.shape)) for n, t in tensors.items()]


def dataset_offset(path, dataset: str) -> int:
    """Byte offset of a contiguous dataset's data inside its file."""
    with h5py.File(path, "r") as f:
        return f[dataset].id.get_offset()


def flip_byte(path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def save_two_positions(root, step: int, full: torch.Tensor, dim: int) -> None:
    """A tensor saved as two pieces along `dim` in two files, as two pipeline ranks would."""
    tmp = root / f".tmp_step_{step}"
    tmp.mkdir(parents=True)
    half = full.shape[dim] // 2
    pieces = full.split([half, full.shape[dim] - half], dim=dim)
    records = []
    for index, piece in enumerate(pieces):
        offsets = tuple(half * index if d == dim else 0 for d in range(full.dim()))
        shard = Shard("w", piece.contiguous(), tuple(full.shape), offsets)
        records += fmt.write_shard_file(tmp, f"pp{index}_tp0", [shard])
    manifest.write_json(tmp / ck.MANIFEST, manifest.build_manifest({}, step, records))
    os.replace(tmp, root / f"step_{step}")


# ---------------------------------------------------------------- round trips and resharding


def test_round_trip_is_exact_for_every_dtype(tmp_path):
    tensors = model_tensors()
    step_dir = save(tmp_path / "run", 5, tensors)
    assert step_dir == tmp_path / "run" / "step_5"
    assert (tmp_path / "run" / "latest").read_text().strip() == "step_5"
    manifest, got = ck.load_checkpoint(tmp_path / "run", wanted_whole(tensors))
    assert manifest["step"] == 5 and manifest["config"] == {"model": {"d_model": 4}}
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    assert ck.verify(step_dir) == []


def test_datasets_are_flat_with_attributes(tmp_path):
    step_dir = save(tmp_path / "run", 1, model_tensors())
    with h5py.File(step_dir / "pp0_tp0.h5", "r") as f:
        assert all(isinstance(f[k], h5py.Dataset) for k in f)  # '/' in names made no groups
        ds = f["optim.exp_avg%2Flayers.0.attn.qkv.weight"]
        assert ds.attrs["name"] == "optim.exp_avg/layers.0.attn.qkv.weight"
        assert list(ds.attrs["global_shape"]) == [6, 4] and list(ds.attrs["offsets"]) == [0, 0]
        assert f["layers.1.ln.weight"].attrs["dtype"] == "bfloat16"
        assert f["layers.1.ln.weight"].dtype == "uint16"
        assert len(ds.attrs["xxh3_64"]) == 16


def test_load_a_slice_of_a_tensor_saved_whole(tmp_path):
    tensors = model_tensors()
    save(tmp_path / "run", 1, tensors)
    w = tensors["layers.0.attn.qkv.weight"]
    _, got = ck.load_checkpoint(
        tmp_path / "run" / "step_1", [("layers.0.attn.qkv.weight", (6, 4), (2, 1), (3, 2))]
    )
    assert torch.equal(got["layers.0.attn.qkv.weight"], w[2:5, 1:3])


@pytest.mark.parametrize("dim", [0, 1])
def test_load_across_pieces_saved_in_two_files(tmp_path, dim):
    full = torch.arange(6 * 8, dtype=torch.float64).reshape(6, 8)
    save_two_positions(tmp_path, 3, full, dim)
    step_dir = tmp_path / "step_3"
    _, got = ck.load_checkpoint(step_dir, [("w", (6, 8), (0, 0), (6, 8))])
    assert torch.equal(got["w"], full)
    # a slice straddling the cut, along the other dim than the save's
    _, got = ck.load_checkpoint(step_dir, [("w", (6, 8), (1, 2), (4, 5))])
    assert torch.equal(got["w"], full[1:5, 2:7])
    assert ck.verify(step_dir) == []


def test_pieces_that_do_not_tile_are_refused():
    record = {"name": "w", "global_shape": [4], "dtype": "float32", "file": "a.h5"}
    piece = {"dataset": "w", "shape": [2], "xxh3_64": "x"}
    half = [{**record, **piece, "offsets": [0]}]
    with pytest.raises(CheckpointError, match="hold 2 of the 4 elements"):
        manifest.build_manifest({}, 1, half)
    overlapping = [{**record, **piece, "offsets": [0]}, {**record, **piece, "offsets": [1]}]
    with pytest.raises(CheckpointError, match="overlap"):
        manifest.build_manifest({}, 1, overlapping)
    copies = [{**record, **piece, "shape": [4], "offsets": [0]}] * 2  # a replicated tensor
    assert len(manifest.build_manifest({}, 1, copies)["tensors"]["w"]["pieces"]) == 2


def test_global_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path):
    save(tmp_path / "run", 1, model_tensors())
    with pytest.raises(CheckpointError, match=r"layers.0.mlp.fc.weight.*\(5, 3\).*\(5, 4\)"):
        ck.load_checkpoint(tmp_path / "run", [("layers.0.mlp.fc.weight", (5, 4), (0, 0), (5, 4))])
    with pytest.raises(CheckpointError, match="no tensor 'nope'"):
        ck.load_checkpoint(tmp_path / "run", [("nope", (1,), (0,), (1,))])


def test_bad_shards_and_reserved_keys_are_refused_and_keep_the_previous_step(tmp_path):
    tensors = model_tensors()
    save(tmp_path / "run", 1, tensors)
    bad = [Shard("w", torch.zeros(3), (4,), (2,))]
    with pytest.raises(CheckpointError, match="does not fit"):
        ck.save_checkpoint(tmp_path / "run", 2, COMM, bad, True, "pp0_tp0", {})
    with pytest.raises(CheckpointError, match="may not set"):
        save(tmp_path / "run", 2, tensors, manifest={"tensors": 1})
    assert ck.resolve(tmp_path / "run").name == "step_1"
    assert ck.find_latest_valid(tmp_path / "run") == tmp_path / "run" / "step_1"


def test_saving_a_step_again_replaces_it(tmp_path):
    tensors = model_tensors()
    save(tmp_path / "run", 4, tensors)
    tensors["optim.step"] = torch.tensor(99)
    save(tmp_path / "run", 4, tensors)
    _, got = ck.load_checkpoint(tmp_path / "run", [("optim.step", (), (), ())])
    assert int(got["optim.step"]) == 99
    ck.wait_for_pruning()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["latest", "step_4"]


# ---------------------------------------------------------------- damage


def test_corrupt_byte_names_file_and_dataset(tmp_path):
    step_dir = save(tmp_path / "run", 1, model_tensors())
    path = step_dir / "pp0_tp0.h5"
    flip_byte(path, dataset_offset(path, "layers.0.mlp.fc.weight") + 5)
    wanted = [("layers.0.mlp.fc.weight", (5, 3), (0, 0), (5, 3))]
    with pytest.raises(CheckpointError, match=r"pp0_tp0\.h5.*layers\.0\.mlp\.fc\.weight.*checksum"):
        ck.load_checkpoint(step_dir, wanted)
    # untouched tensors of the same file still load
    ck.load_checkpoint(step_dir, [("layers.1.ln.weight", (7,), (0,), (7,))])
    problems = ck.verify(step_dir)
    assert len(problems) == 1 and "checksum" in problems[0]


def test_checksums_are_xxh3_64_of_the_stored_bytes():
    empty = np.zeros(0, dtype=np.uint8)
    assert checksum.compute("xxh3_64", empty) == "2d06800538d394c2"  # xxHash's test vector
    assert checksum.compute("sha256", empty).startswith("e3b0c442")
    x = np.arange(6, dtype="<f8")
    assert fmt.digest_of(x) == checksum.compute("xxh3_64", x)
    assert fmt.digest_of(x) != fmt.digest_of(x[::-1].copy())  # order matters, unlike a sum
    assert fmt.digest_of(x.reshape(2, 3)) == fmt.digest_of(x)  # bytes, not shape
    with pytest.raises(ValueError, match="unknown checksum algorithm 'md4'"):
        checksum.compute("md4", x)


def as_format_version_1(step_dir) -> None:
    """Rewrite a step as hpcpipe format 1 wrote it: SHA-256 per piece instead of XXH3-64."""
    manifest = json.loads((step_dir / "manifest.json").read_text())
    manifest["format_version"] = 1
    with h5py.File(step_dir / "pp0_tp0.h5", "a") as f:
        for entry in manifest["tensors"].values():
            for piece in entry["pieces"]:
                ds = f[piece["dataset"]]
                piece["sha256"] = checksum.compute("sha256", np.asarray(ds[()]))
                del piece["xxh3_64"], ds.attrs["xxh3_64"], piece["byte_offset"]
                ds.attrs["sha256"] = piece["sha256"]
    (step_dir / "manifest.json").write_text(json.dumps(manifest))


def test_format_version_1_checkpoints_still_load_and_verify(tmp_path):
    tensors = model_tensors()
    step_dir = save(tmp_path / "run", 1, tensors)
    as_format_version_1(step_dir)
    _, got = ck.load_checkpoint(step_dir, wanted_whole(tensors))
    assert all(torch.equal(got[n], t) for n, t in tensors.items())
    assert ck.verify(step_dir) == []
    path = step_dir / "pp0_tp0.h5"
    flip_byte(path, dataset_offset(path, "layers.0.mlp.fc.weight") + 5)
    with pytest.raises(CheckpointError, match=r"layers\.0\.mlp\.fc\.weight.*checksum mismatch"):
        ck.load_checkpoint(step_dir, wanted_whole(tensors))


def test_loads_read_at_the_recorded_byte_offset_and_the_checksum_guards_it(tmp_path):
    tensors = model_tensors()
    step_dir = save(tmp_path / "run", 1, tensors)
    manifest = json.loads((step_dir / "manifest.json").read_text())
    piece = manifest["tensors"]["layers.0.mlp.fc.weight"]["pieces"][0]
    path = step_dir / "pp0_tp0.h5"
    assert piece["byte_offset"] == dataset_offset(path, "layers.0.mlp.fc.weight")
    _, got = ck.load_checkpoint(step_dir, wanted_whole(tensors))
    assert all(torch.equal(got[n], t) for n, t in tensors.items())
    piece["byte_offset"] = dataset_offset(path, "layers.0.attn.qkv.weight")  # wrong bytes
    (step_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"layers\.0\.mlp\.fc\.weight.*checksum mismatch"):
        ck.load_checkpoint(step_dir, [("layers.0.mlp.fc.weight", (5, 3), (0, 0), (5, 3))])


def test_load_into_existing_tensors_fills_them_in_place(tmp_path):
    tensors = model_tensors()
    step_dir = save(tmp_path / "run", 1, tensors)
    into = {n: torch.zeros_like(t) for n, t in tensors.items()}
    into["layers.0.mlp.fc.weight"] = torch.zeros(5, 3, dtype=torch.float64)  # another dtype
    wide = torch.zeros(6, 8, dtype=torch.float64)
    into["layers.0.attn.qkv.weight"] = wide[:, :4]  # not contiguous
    _, got = ck.load_checkpoint(step_dir, wanted_whole(tensors), into=into)
    for name, t in tensors.items():
        assert got[name] is into[name]
        assert torch.equal(got[name], t.to(got[name].dtype))
    assert torch.equal(wide[:, 4:], torch.zeros(6, 4, dtype=torch.float64))
    slice_into = torch.zeros(2, 2, dtype=torch.float64)
    _, got = ck.load_checkpoint(
        step_dir,
        [("layers.0.attn.qkv.weight", (6, 4), (1, 2), (2, 2))],
        into={"layers.0.attn.qkv.weight": slice_into},
    )
    assert got["layers.0.attn.qkv.weight"] is slice_into
    assert torch.equal(slice_into, tensors["layers.0.attn.qkv.weight"][1:3, 2:4])


def test_a_newer_format_is_refused_with_upgrade_advice(tmp_path):
    step_dir = save(tmp_path / "run", 1, model_tensors())
    manifest = json.loads((step_dir / "manifest.json").read_text())
    manifest["format_version"] = 99
    (step_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="format_version 99.*reads 1 and 2.*upgrade"):
        ck.load_checkpoint(step_dir, [])


def test_truncated_file(tmp_path):
    step_dir = save(tmp_path / "run", 1, model_tensors())
    path = step_dir / "pp0_tp0.h5"
    os.truncate(path, path.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=r"pp0_tp0\.h5.*truncated"):
        ck.load_checkpoint(step_dir, wanted_whole(model_tensors()))
    assert ck.verify(step_dir) and "truncated" in ck.verify(step_dir)[0]


def test_missing_shard_file_and_missing_dataset(tmp_path):
    step_dir = save(tmp_path / "run", 1, model_tensors())
    with h5py.File(step_dir / "pp0_tp0.h5", "a") as f:
        del f["odd%252Fname"]
    with pytest.raises(CheckpointError, match=r"odd%252Fname.*dataset missing"):
        ck.load_checkpoint(step_dir, [("odd%2Fname", (3,), (0,), (3,))])
    (step_dir / "pp0_tp0.h5").unlink()
    with pytest.raises(CheckpointError, match=r"pp0_tp0\.h5: shard file missing"):
        ck.load_checkpoint(step_dir, [("optim.step", (), (), ())])
    assert any("shard file missing" in p for p in ck.verify(step_dir))


def test_missing_or_bad_manifest(tmp_path):
    step_dir = save(tmp_path / "run", 1, model_tensors())
    (step_dir / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable manifest"):
        ck.load_checkpoint(step_dir, [])
    (step_dir / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no manifest"):
        ck.load_checkpoint(tmp_path / "run", [])
    assert "no manifest" in ck.verify(step_dir)[0]


def test_find_latest_valid_falls_back_past_a_corrupt_step(tmp_path):
    root = tmp_path / "run"
    for step in (1, 2, 3):
        save(root, step, model_tensors())
    path = root / "step_3" / "pp0_tp0.h5"
    flip_byte(path, dataset_offset(path, "embed.positions"))
    (root / "step_2" / "manifest.json").unlink()
    with pytest.warns(UserWarning) as caught:
        assert ck.find_latest_valid(root) == root / "step_1"
    assert "step_3" in str(caught[0].message) and "checksum" in str(caught[0].message)
    assert "step_2" in str(caught[1].message) and "no manifest" in str(caught[1].message)
    assert ck.find_latest_valid(tmp_path / "empty") is None


def test_keep_prunes_old_steps(tmp_path):
    root = tmp_path / "run"
    for step in range(1, 6):
        save(root, step, {"w": torch.ones(2)}, keep=2)
    assert [s for s, _ in ck.list_steps(root)] == [4, 5]
    save(root, 6, {"w": torch.ones(2)}, keep=0)  # keep < 1 keeps everything
    assert [s for s, _ in ck.list_steps(root)] == [4, 5, 6]
    ck.wait_for_pruning()
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_4", "step_5", "step_6"]


def test_leftover_tmp_dir_is_ignored_then_cleaned(tmp_path, capsys):
    root = tmp_path / "runs" / "a"
    save(root, 1, {"w": torch.ones(2)})
    junk = root / ".tmp_step_2"
    junk.mkdir()
    (junk / "pp0_tp0.h5").write_bytes(b"half a file")
    assert [s for s, _ in ck.list_steps(root)] == [1]
    assert ck.resolve(root).name == "step_1"
    assert ck.find_latest_valid(root) == root / "step_1"
    assert cli(["ls", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert "step_1" in out and ".tmp_step" not in out and "step_2" not in out
    save(root, 2, {"w": torch.ones(2)})
    assert not junk.exists() and ck.resolve(root).name == "step_2"


# ---------------------------------------------------------------- command line


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hpcpipe")
    add_ckpt_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["ckpt", *argv])
    return args.func(args)


def test_cli_ls_marks_latest(tmp_path, capsys):
    for step in (10, 20):
        save(tmp_path / "runs" / "gpt", step, {"w": torch.ones(2)})
    assert cli(["ls", str(tmp_path / "runs")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("gpt")
    assert "step_20" in lines[2] and lines[2].lstrip().startswith("*")
    assert not lines[1].lstrip().startswith("*")
    assert cli(["ls", str(tmp_path / "nothing")]) == 0
    assert "no checkpoints" in capsys.readouterr().out


def test_cli_inspect(tmp_path, capsys):
    manifest = {"layout": {"pp": 1, "tp": 1, "dp": 1}, "config": {"model": {"d_model": 4}}}
    save(tmp_path / "run", 7, model_tensors(), manifest=manifest)
    assert cli(["inspect", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "step 7" in out and "pp: 1" in out and "d_model=4" in out
    assert "layers.1.ln.weight" in out and "bfloat16" in out and "pp0_tp0.h5" in out
    assert "6x4" in out and "scalar" in out
    assert cli(["inspect", str(tmp_path / "missing")]) == 1


def test_cli_verify(tmp_path, capsys):
    step_dir = save(tmp_path / "run", 1, model_tensors())
    assert cli(["verify", str(step_dir)]) == 0
    path = step_dir / "pp0_tp0.h5"
    flip_byte(path, dataset_offset(path, "layers.0.mlp.fc.weight"))
    assert cli(["verify", str(step_dir)]) == 1
    assert "checksum mismatch" in capsys.readouterr().out


def test_cli_export_torch_state_dict(tmp_path, capsys):
    full = torch.arange(6 * 8, dtype=torch.float64).reshape(6, 8)
    save_two_positions(tmp_path, 3, full, dim=1)
    out = tmp_path / "export" / "model.pt"
    assert cli(["export", str(tmp_path / "step_3"), "--out", str(out)]) == 0
    assert torch.equal(torch.load(out, weights_only=True)["w"], full)
    tensors = model_tensors()
    save(tmp_path / "run", 1, tensors)
    assert cli(["export", str(tmp_path / "run"), "--out", str(out)]) == 0
    state = torch.load(out, weights_only=True)
    assert sorted(state) == sorted(n for n in tensors if not n.startswith("optim."))
    assert all(torch.equal(state[n], tensors[n]) for n in state)


def test_cli_export_safetensors(tmp_path, capsys):
    save(tmp_path / "run", 1, {"w": torch.ones(2)})
    out = tmp_path / "model.safetensors"
    code = cli(["export", str(tmp_path / "run"), "--out", str(out), "--format", "safetensors"])
    if importlib.util.find_spec("safetensors") is None:
        assert code == 1 and "pip install safetensors" in capsys.readouterr().err
    else:
        from safetensors.torch import load_file

        assert code == 0 and torch.equal(load_file(out)["w"], torch.ones(2))


def test_manifest_records_each_piece(tmp_path):
    step_dir = save(tmp_path / "run", 2, model_tensors())
    manifest = json.loads((step_dir / "manifest.json").read_text())
    entry = manifest["tensors"]["optim.exp_avg/layers.0.attn.qkv.weight"]
    assert entry["global_shape"] == [6, 4] and entry["dtype"] == "float32"
    (piece,) = entry["pieces"]
    assert piece["file"] == "pp0_tp0.h5" and piece["offsets"] == [0, 0]
    assert piece["dataset"] == "optim.exp_avg%2Flayers.0.attn.qkv.weight"
    assert manifest["format_version"] == fmt.FORMAT_VERSION and manifest["files"] == ["pp0_tp0.h5"]
