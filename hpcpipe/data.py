"""Token data: default corpus, HDF5 datasets, resumable sampling, batching (tokenizers:
hpcpipe/tokenizer.py; ByteTokenizer is re-exported here)."""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import h5py
import numpy as np
import torch

from hpcpipe import tokenizer as tok
from hpcpipe.tokenizer import ByteTokenizer

DEFAULT_MAX_BYTES = 4 * 1024 * 1024
DOC_SEPARATOR = "\n\n"
TEXT_SUFFIXES = (".txt", ".md", ".py")
PREPARE_HINT = "make one with: hpcpipe data prepare --out FILE TEXT..."


class Tokenizer(Protocol):
    """What prepare_dataset needs from a tokenizer."""

    name: str
    vocab_size: int

    def encode(self, text: str) -> np.ndarray: ...


@dataclass(frozen=True)
class DatasetInfo:
    """Summary of a written token dataset."""

    path: Path
    num_tokens: int
    vocab_size: int
    tokenizer: str
    sources: tuple[str, ...]
    sha256: str


# ---------------------------------------------------------------- default corpus


def _stdlib_dir() -> Path:
    """Return the directory of the running Python's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def default_corpus_files(max_bytes: int = DEFAULT_MAX_BYTES) -> list[Path]:
    """Return the sorted stdlib top-level .py files needed to fill max_bytes."""
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
    stdlib = _stdlib_dir()
    candidates = sorted((p for p in stdlib.glob("*.py") if p.is_file()), key=lambda p: p.name)
    if not candidates:
        raise FileNotFoundError(f"no .py files in the standard library directory {stdlib}")
    files: list[Path] = []
    total = 0
    for path in candidates:
        if total >= max_bytes:
            break
        files.append(path)
        total += path.stat().st_size + len(DOC_SEPARATOR)
    return files


def _read_text(path: Path) -> str:
    """Read a file as UTF-8, keeping line endings and replacing bad bytes."""
    return path.read_bytes().decode("utf-8", errors="replace")


def default_corpus_text(max_bytes: int = DEFAULT_MAX_BYTES) -> str:
    """Return the default corpus: stdlib sources joined, at most max_bytes of UTF-8."""
    text = DOC_SEPARATOR.join(_read_text(p) for p in default_corpus_files(max_bytes))
    # Cut on bytes, then drop any character split by the cut.
    return text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")


# ---------------------------------------------------------------- HDF5 datasets


def _token_dtype(vocab_size: int) -> np.dtype:
    """Return the smallest unsigned dtype that holds every token id."""
    if vocab_size <= 2**8:
        return np.dtype(np.uint8)
    if vocab_size <= 2**16:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


def _token_sha256(tokens: np.ndarray) -> str:
    """Return the sha256 of the tokens' little-endian bytes."""
    # Fix the byte order so the digest does not depend on the machine.
    le = tokens.astype(tokens.dtype.newbyteorder("<"), copy=False)
    return hashlib.sha256(np.ascontiguousarray(le).tobytes()).hexdigest()


def _collect_files(paths: Sequence[str | Path]) -> list[Path]:
    """Expand paths to text files; directories recurse over known text suffixes."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = (p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
            files.extend(sorted(found))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"text file not found: {path}")
    return files


def write_dataset(
    tokens: np.ndarray, out: str | Path, tokenizer: Tokenizer, sources: Sequence[str]
) -> DatasetInfo:
    """Write tokens to an HDF5 dataset file atomically and return its summary."""
    out = Path(out)
    tokens = np.ascontiguousarray(tokens, dtype=_token_dtype(tokenizer.vocab_size))
    if tokens.size == 0:
        raise ValueError(f"empty corpus: no tokens from sources {list(sources)}")
    digest = _token_sha256(tokens)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target then rename, so readers never see a half-written file.
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            chunk = min(tokens.size, 1 << 20)
            f.create_dataset("tokens", data=tokens, chunks=(chunk,), compression="gzip")
            tok.write_to_dataset(f, tokenizer)  # its name, JSON and sha256
            f.attrs["vocab_size"] = int(tokenizer.vocab_size)
            f.attrs["num_tokens"] = int(tokens.size)
            f.attrs["sources"] = np.array(list(sources), dtype=h5py.string_dtype())
            f.attrs["sha256"] = digest
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return DatasetInfo(
        out, int(tokens.size), int(tokenizer.vocab_size), tokenizer.name, tuple(sources), digest
    )


def prepare_dataset(
    paths: Sequence[str | Path], out: str | Path, tokenizer: Tokenizer | None = None
) -> DatasetInfo:
    """Tokenize text files (directories recurse) into an HDF5 dataset at out."""
    tokenizer = tokenizer or ByteTokenizer()
    files = _collect_files(paths)
    if not files:
        raise ValueError(f"empty corpus: no text files in {[str(p) for p in paths]}")
    text = DOC_SEPARATOR.join(_read_text(p) for p in files)
    return write_dataset(tokenizer.encode(text), out, tokenizer, [str(p) for p in files])


def load_tokens(path: str | Path | None, max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """Return dataset tokens (checksum-verified), or the default corpus when path is None."""
    if path is None:
        return ByteTokenizer().encode(default_corpus_text(max_bytes))
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path} ({PREPARE_HINT})")
    try:
        with h5py.File(path, "r") as f:
            if not isinstance(f.get("tokens"), h5py.Dataset) or "sha256" not in f.attrs:
                raise ValueError(f"{path} is not a token dataset file ({PREPARE_HINT})")
            tokens = f["tokens"][()]
            expected = str(f.attrs["sha256"])
    except OSError as exc:
        raise ValueError(f"{path} is not a readable HDF5 dataset file ({PREPARE_HINT})") from exc
    if _token_sha256(tokens) != expected:
        raise ValueError(f"{path}: token checksum mismatch, the file is corrupt; re-prepare it")
    return tokens


# ---------------------------------------------------------------- sampling


class Sampler:
    """Deterministic, resumable sampler of window start offsets for global batches."""

    def __init__(
        self, num_tokens: int, seq_len: int, batch_size: int, seed: int, holdout: int = 0
    ) -> None:
        """Set up windows of seq_len+1 tokens at offsets k*seq_len; the last `holdout` windows
        (the validation split, see validation_starts) are never sampled."""
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len}, {batch_size}")
        if seed < 0 or holdout < 0:
            raise ValueError(f"seed and holdout must be >= 0, got {seed}, {holdout}")
        self.num_tokens = int(num_tokens)
        self.seq_len = int(seq_len)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.holdout = int(holdout)
        self.num_windows = max(0, (self.num_tokens - 1) // self.seq_len - self.holdout)
        if self.num_windows < self.batch_size:
            need = (self.batch_size + self.holdout) * self.seq_len + 1
            held = f" ({self.holdout} held out for validation)" if self.holdout else ""
            raise ValueError(
                f"{self.num_tokens} tokens give {self.num_windows} training windows of seq_len "
                f"{self.seq_len}{held}, fewer than batch_size {self.batch_size}; "
                f"need at least {need} tokens"
            )
        self.epoch = 0
        self.position = 0
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        """Return (and cache) the window order of an epoch."""
        if epoch != self._perm_epoch:
            rng = np.random.default_rng((self.seed, epoch))
            self._perm = rng.permutation(self.num_windows).astype(np.int64)
            self._perm_epoch = epoch
        return self._perm

    def peek_starts(self) -> np.ndarray:
        """The batch next_starts would return, the sampler left where it is (2BW reads the
        next batch a step early; copying the sampler would copy its epoch's permutation)."""
        saved = self.epoch, self.position
        try:
            return self.next_starts()
        finally:
            self.epoch, self.position = saved

    def next_starts(self) -> np.ndarray:
        """Return the token offsets (int64, shape [batch_size]) of the next global batch."""
        out = np.empty(self.batch_size, dtype=np.int64)
        filled = 0
        while filled < self.batch_size:
            take = min(self.batch_size - filled, self.num_windows - self.position)
            perm = self._permutation(self.epoch)
            out[filled : filled + take] = perm[self.position : self.position + take]
            filled += take
            self.position += take
            # Keep the state canonical: a finished epoch is stored as the next one's start.
            if self.position == self.num_windows:
                self.epoch += 1
                self.position = 0
        return out * self.seq_len

    def state_dict(self) -> dict[str, int]:
        """Return the position to resume from."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        """Resume from a state_dict so the following batches match an uninterrupted run."""
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.num_windows:
            raise ValueError(
                f"bad sampler state {state}: need epoch >= 0 and 0 <= position <= "
                f"{self.num_windows}"
            )
        if position == self.num_windows:
            epoch, position = epoch + 1, 0
        self.epoch, self.position = epoch, position


def holdout_windows(num_tokens: int, seq_len: int, fraction: float) -> int:
    """How many windows (the last ones) data.val_fraction holds out: at least 1 when > 0."""
    windows = max(0, (int(num_tokens) - 1) // int(seq_len))
    return max(1, int(windows * fraction)) if fraction > 0 and windows else 0


def validation_starts(num_tokens: int, seq_len: int, holdout: int) -> np.ndarray:
    """Token offsets (int64, in file order) of the last `holdout` windows: the ones a Sampler
    with the same holdout never draws. The same every time: no seed, no state."""
    windows = max(0, (int(num_tokens) - 1) // int(seq_len))
    if not 0 < holdout <= windows:
        raise ValueError(
            f"{num_tokens} tokens give {windows} windows of seq_len {seq_len}; cannot hold out "
            f"{holdout} for validation (need at least seq_len + 1 = {seq_len + 1} tokens)"
        )
    return np.arange(windows - holdout, windows, dtype=np.int64) * int(seq_len)


# ---------------------------------------------------------------- batching


def make_batch(
    tokens: np.ndarray, starts: Sequence[int] | np.ndarray, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return int64 (inputs, targets) of shape [b, seq_len]; targets are inputs shifted by one."""
    starts = np.asarray(starts, dtype=np.int64).reshape(-1)
    if starts.size and (starts.min() < 0 or starts.max() + seq_len + 1 > len(tokens)):
        raise ValueError(
            f"window starts must lie in [0, {len(tokens) - seq_len - 1}] for "
            f"{len(tokens)} tokens and seq_len {seq_len}"
        )
    windows = np.asarray(tokens)[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64)
    inputs = torch.from_numpy(np.ascontiguousarray(windows[:, :-1]))
    targets = torch.from_numpy(np.ascontiguousarray(windows[:, 1:]))
    return inputs, targets


def _nearest_divisors(n: int, m: int) -> list[int]:
    """Return the divisors of n closest to m from below and above."""
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    below = [d for d in divisors if d < m]
    above = [d for d in divisors if d > m]
    return ([below[-1]] if below else []) + ([above[0]] if above else [])


def split_microbatches(
    inputs: torch.Tensor, targets: torch.Tensor, num_micro: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split a batch into num_micro equal, in-order (inputs, targets) microbatches."""
    if inputs.shape != targets.shape:
        raise ValueError(f"inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} differ")
    batch = inputs.shape[0]
    if num_micro < 1 or batch % num_micro != 0:
        nearest = ", ".join(str(d) for d in _nearest_divisors(batch, num_micro))
        raise ValueError(
            f"batch size {batch} is not divisible into M={num_micro} microbatches; "
            f"nearest valid M: {nearest}"
        )
    size = batch // num_micro
    return list(zip(inputs.split(size), targets.split(size), strict=True))


# ---------------------------------------------------------------- command line


def _cmd_prepare(args: argparse.Namespace) -> int:
    """Run `hpcpipe data prepare`; return an exit status."""
    if not args.texts and not args.default_corpus:
        print("error: give TEXT files or --default-corpus", file=sys.stderr)
        return 2
    if (args.tokenizer == "bpe") != (args.vocab_size is not None):
        print("error: --tokenizer bpe needs --vocab-size N, and only it takes one", file=sys.stderr)
        return 2
    try:
        parts, sources = [], []
        if args.default_corpus:
            # Same text as load_tokens(None), so a prepared default corpus matches it exactly.
            parts = [default_corpus_text(args.max_bytes)]
            sources = [p.name for p in default_corpus_files(args.max_bytes)]
        files = _collect_files(args.texts)
        if not parts and not files:
            raise ValueError(f"empty corpus: no text files in {[str(p) for p in args.texts]}")
        parts += [_read_text(p) for p in files]
        sources += [str(p) for p in files]
        if args.tokenizer == "bpe":
            tokenizer = tok.BPETokenizer.train(parts, args.vocab_size)
        else:
            tokenizer = tok.load_tokenizer(args.tokenizer)
        tokens = tokenizer.encode(DOC_SEPARATOR.join(parts))
        info = write_dataset(tokens, args.out, tokenizer, sources)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {info.num_tokens} tokens from {len(info.sources)} sources to {info.path}")
    print(f"tokenizer {info.tokenizer} (vocab {info.vocab_size}), sha256 {info.sha256}")
    if info.tokenizer != tok.BYTES:
        print(f"train with --data.path={info.path} --model.vocab_size={info.vocab_size}")
    return 0


def _add_data_subcommands(parser: argparse.ArgumentParser) -> None:
    """Register the subcommands of `hpcpipe data` on parser."""
    sub = parser.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    prep = sub.add_parser("prepare", help="tokenize text files into an HDF5 dataset")
    prep.add_argument("--out", required=True, type=Path, help="HDF5 file to write")
    prep.add_argument(
        "--default-corpus",
        action="store_true",
        help="include the default corpus (this Python's stdlib sources)",
    )
    prep.add_argument(
        "--max-bytes",
        type=int,
        default=DEFAULT_MAX_BYTES,
        help="cap on default corpus bytes (default: %(default)s)",
    )
    prep.add_argument(
        "--tokenizer",
        default=tok.BYTES,
        metavar="NAME|FILE",
        help=f"{tok.SPECS}; stored in the HDF5 file with its sha256 (default: %(default)s)",
    )
    prep.add_argument(
        "--vocab-size", type=int, help="--tokenizer bpe: ids to train (at least 256, the bytes)"
    )
    prep.add_argument("texts", nargs="*", type=Path, metavar="TEXT", help="text files or dirs")
    prep.set_defaults(func=_cmd_prepare)


def add_data_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `data` subcommand (with `prepare`) on a CLI's subparsers."""
    parser = subparsers.add_parser("data", help="prepare token datasets")
    _add_data_subcommands(parser)
    return parser


def dataset_main(argv: Sequence[str] | None = None) -> int:
    """Run `hpcpipe data ...` from argv (e.g. ["prepare", "--out", F, ...]); return exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Accept the full command line too, so callers may pass ["data", "prepare", ...].
    if argv[:1] == ["data"]:
        argv = argv[1:]
    parser = argparse.ArgumentParser(prog="hpcpipe data", description="prepare token datasets")
    _add_data_subcommands(parser)
    args = parser.parse_args(argv)
    return args.func(args)
