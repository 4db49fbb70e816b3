"""`hpcpipe generate`: continue prompts with a saved model, on 1 process or any (pp, tp) layout."""

from __future__ import annotations

import json
import sys
import traceback

GREEDY = "greedy (argmax) unless --temperature is given"


def add_generate_parser(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text from a checkpoint or a Hugging Face folder (1 rank or mpiexec)",
        description="Continue each prompt by --max-new-tokens tokens with the weights of PATH "
        "(an hpcpipe checkpoint, or a Hugging Face folder as --init-from takes), on one "
        "process or under mpiexec -n PP*TP with --pp/--tp. Several prompts are generated "
        f"together as micro-batches, so the pipeline stages overlap. Sampling is {GREEDY}. "
        "Text is encoded and decoded with the tokenizer PATH records (the byte tokenizer when "
        "it records none). Other config keys as --section.key=value (e.g. --model.seq_len=N, "
        "--train.device=cuda, --parallel.partition=[2,2]).",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH",
        help="hpcpipe checkpoint (step or run folder) or Hugging Face folder",
    )
    p.add_argument(
        "--prompt",
        action="append",
        dest="inputs",
        type=lambda s: ("text", s),
        metavar="TEXT",
        help="a prompt (repeat for several)",
    )
    p.add_argument(
        "--tokens",
        action="append",
        dest="inputs",
        type=lambda s: ("ids", s),
        metavar="IDS",
        help="a prompt as token ids, e.g. 1,2,3 (repeat for several)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        required=True,
        metavar="N",
        help="tokens to generate per prompt",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        metavar="T",
        help="sample from softmax(logits / T); 0 or absent: greedy",
    )
    p.add_argument(
        "--top-k",
        type=int,
        default=0,
        metavar="K",
        help="sample among the K most likely tokens only (0: all)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="S",
        help="sampling seed: prompt i draws from torch.Generator seeded S + i",
    )
    p.add_argument(
        "--format",
        choices=["text", "json"],
        default="text",
        help="text: each prompt and its continuation; json: one object per prompt "
        "with `tokens` (the new ids) and `text` (their text)",
    )
    p.add_argument("--pp", type=int, metavar="N", help="pipeline stages (= --parallel.pp)")
    p.add_argument("--tp", type=int, metavar="N", help="tensor-parallel ranks (= --parallel.tp)")
    p.add_argument("--dtype", metavar="DTYPE", help="float32 (default), float64, bfloat16, float16")
    p.add_argument(
        "--no-kv-cache",
        action="store_true",
        help="recompute the whole prefix every step (slow; for families without "
        "the key/value cache protocol, and as a check)",
    )
    p.set_defaults(func=run_generate)


def _report(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _ids(text: str) -> list[int]:
    from hpcpipe.config import ConfigError

    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ConfigError(f"--tokens {text!r}: give integer ids, e.g. --tokens 1,2,3") from None


def _tokenizer(path: str, needed: bool):
    """The tokenizer PATH records; without text prompts a missing one only costs the text."""
    from hpcpipe import tokenizer as tok
    from hpcpipe.checkpoint.format import CheckpointError

    try:
        return tok.tokenizer_of_checkpoint(path)
    except (tok.TokenizerError, CheckpointError) as exc:
        if needed:
            raise
        _report(f"hpcpipe generate: warning: no tokenizer ({exc}); `text` will be null")
        return None


def _decode(tokenizer, ids: list[int]) -> str | None:
    """The text of ids, or None when the tokenizer has no text for some of them."""
    if tokenizer is None:
        return None
    try:
        return tokenizer.decode(ids)
    except ValueError:  # e.g. ids past 255 with the byte tokenizer
        return None


def _setup(args):
    """(config, prompts as ids, tokenizer, sampling): every check that needs no MPI."""
    from hpcpipe.train import generate as gen
    from hpcpipe.train import init_from

    overrides = dict(args.overrides)
    for flag, dotted in (("pp", "parallel.pp"), ("tp", "parallel.tp"), ("dtype", "train.dtype")):
        if getattr(args, flag) is not None:
            overrides[dotted] = getattr(args, flag)
    config = init_from.load_config(None, overrides, args.checkpoint)
    inputs = args.inputs or []
    tokenizer = _tokenizer(args.checkpoint, needed=any(kind == "text" for kind, _ in inputs))
    prompts = [
        [int(t) for t in tokenizer.encode(value)] if kind == "text" else _ids(value)
        for kind, value in inputs
    ]
    sampling = gen.Sampling(args.temperature, args.top_k, args.seed)
    gen.check_prompts(config.model, prompts, args.max_new_tokens)
    gen.check_layout(config, _world_size(), kv_cache=not args.no_kv_cache)
    init_from.check_weights(config, args.checkpoint)  # names and shapes, from headers
    return config, prompts, tokenizer, sampling


def _world_size() -> int:
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_size()


def _print(args, prompts, tokenizer, result) -> None:
    for i, (prompt, new) in enumerate(zip(prompts, result.tokens, strict=True)):
        text = _decode(tokenizer, new)
        if args.format == "json":
            print(json.dumps({"prompt": i, "tokens": new, "text": text}, ensure_ascii=False))
            continue
        whole = _decode(tokenizer, prompt + new)
        print(whole if whole is not None else f"tokens: {prompt} + {new}")
        print("---")
    layout = result.layout
    _report(
        f"hpcpipe generate: {len(prompts)} prompt(s) x {args.max_new_tokens} new tokens in "
        f"{result.seconds:.2f} s ({result.tokens_per_s:.1f} tokens/s), pp={layout['pp']} "
        f"tp={layout['tp']}, {layout['dtype']}{'' if layout['kv_cache'] else ', no kv cache'}"
    )


def run_generate(args) -> int:
    """Check everything on every rank before any communication, then generate."""
    from mpi4py import MPI

    from hpcpipe.train import generate as gen

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    try:
        config, prompts, tokenizer, sampling = _setup(args)
    except ValueError as exc:  # ConfigError, TokenizerError, CheckpointError
        # every rank reaches the same verdict from the same inputs: all exit without waiting
        _report(f"hpcpipe generate: configuration error (rank {rank}): {exc}")
        return 2
    try:
        result = gen.generate(
            config, comm, args.checkpoint, prompts, args.max_new_tokens, sampling,
            kv_cache=not args.no_kv_cache,
        )  # fmt: skip
    except BaseException as exc:  # noqa: BLE001 - any failure must bring the whole job down
        _report(f"hpcpipe generate: world rank {rank} failed: {exc}\n{traceback.format_exc()}")
        if comm.Get_size() > 1:
            comm.Abort(1)
        return 1
    if rank == 0:
        _print(args, prompts, tokenizer, result)
    return 0
