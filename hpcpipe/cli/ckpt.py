"""`hpcpipe ckpt ls|inspect|verify|export`: look into and convert sharded checkpoints."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

from hpcpipe.checkpoint import store as ck
from hpcpipe.checkpoint.format import RESERVED, CheckpointError
from hpcpipe.checkpoint.manifest import read_manifest


def _err(message: str) -> int:
    """Print an error to stderr; return the failing exit code."""
    print(f"hpcpipe ckpt: {message}", file=sys.stderr)
    return 1


def _size(path: Path) -> str:
    """Total size of a directory, human-readable."""
    size = float(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()))
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            break
        size /= 1024
    return f"{size:.1f} {unit}"


def _describe_run(run: Path) -> list[str]:
    """One line per committed step of a run, the one `latest` names marked."""
    latest = ck.latest_step_dir(run)
    lines = [f"{run}"]
    for _, step_dir in ck.list_steps(run):
        mark = "*" if latest is not None and step_dir.name == latest.name else " "
        note = "" if (step_dir / ck.MANIFEST).is_file() else "  (no manifest: invalid)"
        lines.append(f"  {mark} {step_dir.name:<16} {_size(step_dir):>11}{note}")
    if latest is not None and not latest.is_dir():
        lines.append(f"  ! latest names {latest.name}, which does not exist")
    return lines


def run_ls(args) -> int:
    """List runs and their steps (latest marked with *)."""
    root = Path(args.dir)
    runs = [root] if ck.list_steps(root) else ck.list_runs(root)
    if not runs:
        print(f"no checkpoints under {root}")
        return 0
    for run in runs:
        print("\n".join(_describe_run(run)))
    print("(* = latest)")
    return 0


def _summary(value, width: int = 96) -> str:
    """A compact one-line JSON rendering, cut to `width`."""
    text = json.dumps(value, separators=(",", "="), sort_keys=True).replace('"', "")
    return text if len(text) <= width else text[: width - 3] + "..."


def run_inspect(args) -> int:
    """Print step, layout, config summary and every tensor with its shape, dtype and files."""
    try:
        step_dir = ck.resolve(args.path)
        manifest = read_manifest(step_dir)
    except CheckpointError as exc:
        return _err(str(exc))
    print(f"checkpoint {step_dir}  step {manifest['step']}  format v{manifest['format_version']}")
    for key in ("layout", "config"):
        value = manifest.get(key)
        if isinstance(value, dict):
            print(f"{key}:")
            for k, v in value.items():
                print(f"  {k}: {_summary(v)}")
        elif value is not None:
            print(f"{key}: {_summary(value)}")
    others = [k for k in manifest if k not in (*RESERVED, "step", "layout", "config")]
    for key in others:
        print(f"{key}: {_summary(manifest[key])}")
    print(f"files: {', '.join(manifest['files'])}")
    tensors = manifest["tensors"]
    width = max((len(n) for n in tensors), default=4)
    print(f"tensors ({len(tensors)}):")
    for name, entry in tensors.items():
        shape = "x".join(str(n) for n in entry["global_shape"]) or "scalar"
        files = sorted({p["file"] for p in entry["pieces"]})
        print(f"  {name:<{width}}  {shape:>14}  {entry['dtype']:<8}  {', '.join(files)}")
    return 0


def run_verify(args) -> int:
    """Exit 0 when the checkpoint verifies (every file, dataset and checksum), else 1."""
    problems = ck.verify(args.path)
    if not problems:
        print(f"{args.path}: OK")
        return 0
    print(f"{args.path}: {len(problems)} problem(s)")
    for problem in problems:
        print(f"  {problem}")
    return 1


def run_export(args) -> int:
    """Assemble the full model parameters (not optim.*) into one state dict file.

    --format hf writes a Hugging Face folder instead (config.json + model.safetensors) that
    transformers' AutoModelForCausalLM.from_pretrained loads, with the run's tokenizer.json.
    """
    if args.format == "hf":
        return _export_hf(args)
    if args.dtype:
        return _err("--dtype applies to --format hf only")
    if args.format == "safetensors" and importlib.util.find_spec("safetensors") is None:
        return _err(
            "--format safetensors needs the safetensors package (pip install safetensors); "
            "--format torch works without it"
        )
    try:
        manifest, tensors = ck.full_tensors(args.path, keep=lambda n: not n.startswith("optim."))
    except CheckpointError as exc:
        return _err(str(exc))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.format == "safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(out), metadata={"step": str(manifest["step"])})
    else:
        torch.save(tensors, out)
    print(f"wrote {len(tensors)} tensors of step {manifest['step']} to {out} ({args.format})")
    return 0


def _export_hf(args) -> int:
    """`export --format hf`: the checkpoint as a Hugging Face model folder."""
    from hpcpipe.checkpoint import hf

    if importlib.util.find_spec("safetensors") is None:
        return _err("--format hf needs the safetensors package (pip install safetensors)")
    from hpcpipe import tokenizer as tok

    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        tokenizer = tok.tokenizer_of_checkpoint(args.path)  # before writing: it may be missing
        manifest, count = hf.export(args.path, args.out, dtype=dtype)
        tok.write_hf_files(tokenizer, args.out)
    except (CheckpointError, tok.TokenizerError) as exc:  # HFError too
        return _err(str(exc))
    print(f"wrote {count} tensors of step {manifest['step']} to {args.out} (Hugging Face folder)")
    print(f"with {tok.TOKENIZER_FILE} ({tokenizer.name}, vocab {tokenizer.vocab_size})")
    return 0


def add_ckpt_parser(subparsers) -> None:
    """Register `ckpt` with its ls / inspect / verify / export subcommands."""
    p = subparsers.add_parser("ckpt", help="list, inspect, verify and export checkpoints")
    sub = p.add_subparsers(dest="ckpt_command", required=True)
    ls = sub.add_parser("ls", help="runs and their steps (* = latest)")
    ls.add_argument("dir", nargs="?", default="checkpoints", help="default: checkpoints/")
    ls.set_defaults(func=run_ls)
    inspect = sub.add_parser("inspect", help="layout, step, config and tensors of a checkpoint")
    inspect.add_argument("path", help="a step directory, or a run root (follows latest)")
    inspect.set_defaults(func=run_inspect)
    verify = sub.add_parser("verify", help="check every file, dataset and checksum (exit 1 if bad)")
    verify.add_argument("path", help="a step directory, or a run root (follows latest)")
    verify.set_defaults(func=run_verify)
    export = sub.add_parser(
        "export",
        help="full model parameters as one state dict, or a Hugging Face folder (--format hf)",
    )
    export.add_argument("path", help="a step directory, or a run root (follows latest)")
    export.add_argument(
        "--out",
        required=True,
        help="output file, e.g. model.pt; with --format hf a folder (config.json, "
        "model.safetensors, tokenizer.json) for transformers' from_pretrained",
    )
    export.add_argument("--format", choices=["torch", "safetensors", "hf"], default="torch")
    export.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16", "float64"],
        help="--format hf: cast the weights (default: the dtype they were saved in)",
    )
    export.set_defaults(func=run_export)
