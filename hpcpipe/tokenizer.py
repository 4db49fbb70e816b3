"""Tokenizers: UTF-8 bytes (the default) and byte-level BPE trained with the `tokenizers` library.

Every tokenizer is one JSON document in the `tokenizers` library's format, the `tokenizer.json`
that transformers' PreTrainedTokenizerFast(tokenizer_file=...) reads, and its `digest` is the
SHA-256 of that text. A dataset stores the JSON beside its tokens, each checkpoint step beside
its shards and a Hugging Face export as tokenizer.json, so whoever holds the weights can turn
ids back into text. The byte tokenizer's JSON is a byte-level BPE without merges whose id for
each byte is the byte's value: transformers decodes a byte model's ids too.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import h5py
import numpy as np

TOKENIZER_FILE = "tokenizer.json"  # in a checkpoint step folder and a Hugging Face folder
HF_CONFIG = "tokenizer_config.json"
DATASET_KEY = "tokenizer"  # the HDF5 dataset holding the JSON (attrs: tokenizer, *_sha256)
SHA_ATTR = "tokenizer_sha256"
BYTES = "bytes"
SPECS = "bytes (the default), bpe (train one: --vocab-size N), or a tokenizer.json file"


class TokenizerError(ValueError):
    """A tokenizer that cannot be made or found; the message says what to do."""


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of a vocabulary."""
    for dtype in (np.uint8, np.uint16):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    return np.dtype(np.uint32)


def _check_ids(ids, vocab_size: int) -> np.ndarray:
    """ids as a flat int64 array; out-of-range ids are refused rather than wrapped."""
    arr = np.asarray(ids).reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        raise ValueError(
            f"token ids must be in [0, {vocab_size - 1}], got [{arr.min()}, {arr.max()}]"
        )
    return arr.astype(np.int64)


# ---------------------------------------------------------------- bytes


@functools.cache
def _byte_symbols() -> tuple[str, ...]:
    """GPT-2's printable stand-in for each byte value (what the ByteLevel pre-tokenizer emits)."""
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    extra = iter(range(256, 512))
    return tuple(chr(b) if b in printable else chr(next(extra)) for b in range(256))


@functools.cache
def _byte_json() -> str:
    """The byte tokenizer as a `tokenizers` JSON: byte-level BPE, id = byte value, no merges."""
    level = {"add_prefix_space": False, "trim_offsets": False, "use_regex": True}
    doc = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", **level},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", **level},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "vocab": {s: b for b, s in enumerate(_byte_symbols())},
            "merges": [],
        },
    }
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))


class ByteTokenizer:
    """Tokenizer whose tokens are the UTF-8 bytes of the text."""

    name = BYTES
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        """Return the UTF-8 bytes of text as a uint8 array."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()

    def decode(self, ids) -> str:
        """Return the text for byte ids; invalid UTF-8 becomes U+FFFD."""
        arr = np.asarray(ids).reshape(-1)
        # Refuse out-of-range ids rather than let astype wrap them silently.
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError(f"byte ids must be in [0, 255], got [{arr.min()}, {arr.max()}]")
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def to_json(self) -> str:
        """This tokenizer in the `tokenizers` library's JSON format."""
        return _byte_json()

    @property
    def digest(self) -> str:
        """SHA-256 of to_json()."""
        return _sha256(self.to_json())


# ---------------------------------------------------------------- subword


def _library():
    try:
        import tokenizers
    except ImportError:
        raise TokenizerError(
            "subword tokenizers need the `tokenizers` package: pip install tokenizers"
        ) from None
    return tokenizers


class BPETokenizer:
    """A `tokenizers` library tokenizer from its JSON (byte-level BPE when hpcpipe trains one).

    to_json() is the very text it was made from, so its digest is the same wherever it travels.
    """

    def __init__(self, json_text: str):
        try:
            self._tok = _library().Tokenizer.from_str(json_text)
        except Exception as exc:  # noqa: BLE001 - the library raises its own exception type
            raise TokenizerError(f"not a `tokenizers` tokenizer.json ({exc})") from None
        self._json = json_text
        kind = json.loads(json_text).get("model", {}).get("type") or "unknown"
        self.name = kind.lower()
        vocab = self._tok.get_vocab(with_added_tokens=True)
        # ids need not be dense (added tokens may sit past the model's vocabulary)
        self.vocab_size = max(vocab.values(), default=-1) + 1

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Train a byte-level BPE (GPT-2's scheme, no special tokens) of at most vocab_size ids."""
        if vocab_size < 256:
            raise TokenizerError(
                f"--vocab-size {vocab_size}: a byte-level BPE needs at least 256 ids (one per "
                "byte) plus its merges; use --tokenizer bytes for 256"
            )
        t = _library()
        tok = t.Tokenizer(t.models.BPE())
        tok.pre_tokenizer = t.pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False)
        tok.decoder = t.decoders.ByteLevel(add_prefix_space=False, trim_offsets=False)
        trainer = t.trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=t.pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
        return cls(tok.to_str())

    def encode(self, text: str) -> np.ndarray:
        """The ids of text (no special tokens added), in the smallest dtype that holds them."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return np.asarray(ids, dtype=token_dtype(self.vocab_size))

    def decode(self, ids) -> str:
        """The text of ids (special tokens kept); invalid UTF-8 becomes U+FFFD."""
        return self._tok.decode(
            _check_ids(ids, self.vocab_size).tolist(), skip_special_tokens=False
        )

    def to_json(self) -> str:
        """This tokenizer in the `tokenizers` library's JSON format (tokenizer.json)."""
        return self._json

    @property
    def digest(self) -> str:
        """SHA-256 of to_json()."""
        return _sha256(self._json)


def from_json(text: str):
    """The tokenizer of a JSON document: ByteTokenizer for the byte tokenizer's own JSON."""
    return ByteTokenizer() if text == _byte_json() else BPETokenizer(text)


def load_tokenizer(spec_or_path: str | Path):
    """A tokenizer by name ("bytes"), or the one a tokenizer.json, a dataset .h5 or a
    checkpoint / Hugging Face folder holds ("bpe" needs text: BPETokenizer.train)."""
    spec = str(spec_or_path)
    if spec in (BYTES, "byte"):
        return ByteTokenizer()
    if spec == "bpe":
        raise TokenizerError("a bpe tokenizer is trained on text: BPETokenizer.train(texts, N)")
    path = Path(spec)
    if path.is_dir():
        return tokenizer_of_checkpoint(path)
    if not path.is_file():
        raise TokenizerError(f"{spec}: no such tokenizer file; give {SPECS}")
    if h5py.is_hdf5(path):
        return tokenizer_of_dataset(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"{path}: unreadable ({exc})") from None
    try:
        return from_json(text)
    except TokenizerError as exc:
        raise TokenizerError(f"{path}: {exc}") from None


# ---------------------------------------------------------------- datasets


def write_to_dataset(f: h5py.File, tokenizer) -> None:
    """Record a tokenizer in an open HDF5 dataset file: its JSON and digest (bytes: the name)."""
    f.attrs["tokenizer"] = tokenizer.name
    if not hasattr(tokenizer, "to_json"):
        return  # a caller's own tokenizer: only its name is known
    text = tokenizer.to_json()
    f.attrs[SHA_ATTR] = _sha256(text)
    if tokenizer.name != BYTES:  # the byte tokenizer is known by name; its files stay as before
        f.create_dataset(DATASET_KEY, data=text, dtype=h5py.string_dtype("utf-8"))


def dataset_record(path: str | Path) -> dict:
    """{name, vocab_size, sha256 (None when unrecorded), has_json} of a dataset's tokenizer,
    from its attributes alone (no JSON parsed: cheap on every rank)."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            attrs = dict(f.attrs)
            has_json = isinstance(f.get(DATASET_KEY), h5py.Dataset)
    except OSError as exc:
        raise TokenizerError(f"{path} is not a readable HDF5 dataset file ({exc})") from None
    if "vocab_size" not in attrs:
        raise TokenizerError(f"{path} is not a token dataset file (no vocab_size attribute)")
    sha = attrs.get(SHA_ATTR)
    return {
        "name": str(attrs.get("tokenizer", BYTES)),
        "vocab_size": int(attrs["vocab_size"]),
        "sha256": str(sha) if sha is not None else None,
        "has_json": has_json,
    }


def dataset_json(path: str | Path) -> str | None:
    """The tokenizer JSON stored in a dataset file (None for byte datasets); digest checked."""
    path = Path(path)
    record = dataset_record(path)
    if not record["has_json"]:
        return None
    with h5py.File(path, "r") as f:
        raw = f[DATASET_KEY][()]
    text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    if record["sha256"] is not None and _sha256(text) != record["sha256"]:
        raise TokenizerError(
            f"{path}: the stored tokenizer does not match its sha256 {record['sha256']}; the "
            "file is corrupt: re-prepare it"
        )
    return text


def tokenizer_of_dataset(h5path: str | Path):
    """The tokenizer that made a dataset file (files without one were made by bytes)."""
    text = dataset_json(h5path)
    if text is not None:
        return from_json(text)
    record = dataset_record(h5path)
    if record["name"] != BYTES:
        raise TokenizerError(
            f"{h5path}: made by tokenizer {record['name']!r}, which the file does not hold; "
            "re-prepare it with `hpcpipe data prepare --tokenizer ...`"
        )
    return ByteTokenizer()


def check_vocab(vocab_size: int, data_path: str | Path | None) -> None:
    """model.vocab_size against the data's tokenizer (files only; ConfigError when they differ).

    A subword tokenizer must match exactly; with bytes a larger vocabulary is allowed (its rows
    past 255 are never seen, as a Hugging Face model's are when fine-tuned on bytes).
    """
    from hpcpipe.config import ConfigError

    where = f"data.path={data_path}" if data_path else "the built-in corpus"
    try:
        record = dataset_record(data_path) if data_path else {"name": BYTES, "vocab_size": 256}
    except TokenizerError as exc:
        raise ConfigError(str(exc)) from None
    name, need = record["name"], record["vocab_size"]
    if vocab_size == need or (name == BYTES and vocab_size > need):
        return
    fix = f"set model.vocab_size = {need} (--model.vocab_size={need})"
    if name != BYTES:
        fix += f", or re-prepare the data with --vocab-size {vocab_size}"
    raise ConfigError(
        f"model.vocab_size={vocab_size}, but {where} was tokenized by {name} with a vocabulary "
        f"of {need} (ids 0..{need - 1}); {fix}"
    )


# ---------------------------------------------------------------- checkpoints


def checkpoint_record(data_path: str | Path | None) -> dict | None:
    """What a checkpoint's manifest records of its run's tokenizer (None: bytes, nothing)."""
    if not data_path:
        return None
    record = dataset_record(data_path)
    if not record["has_json"]:
        return None
    return {
        "name": record["name"],
        "vocab_size": record["vocab_size"],
        "sha256": record["sha256"],
        "file": TOKENIZER_FILE,
    }


def checkpoint_files(data_path: str | Path | None) -> dict[str, str]:
    """{file name: text} a checkpoint step holds beside its shards for this run's tokenizer."""
    text = dataset_json(data_path) if data_path else None
    return {TOKENIZER_FILE: text} if text is not None else {}


def _hf_tokenizer(folder: Path):
    path = folder / TOKENIZER_FILE
    if path.is_file():
        return load_tokenizer(path)
    slow = [n for n in ("vocab.json", "merges.txt", "tokenizer.model") if (folder / n).is_file()]
    if slow:
        raise TokenizerError(
            f"{folder} has {', '.join(slow)} but no {TOKENIZER_FILE}; write one with "
            "transformers: AutoTokenizer.from_pretrained(FOLDER).save_pretrained(FOLDER)"
        )
    return ByteTokenizer()


def tokenizer_of_checkpoint(path: str | Path):
    """The tokenizer of an hpcpipe checkpoint (a step folder or a run folder) or of a Hugging
    Face folder (its tokenizer.json); the byte tokenizer when none is recorded."""
    from hpcpipe.checkpoint import hf, store
    from hpcpipe.checkpoint.manifest import read_manifest

    path = Path(path)
    if hf.is_hf_folder(path):
        return _hf_tokenizer(path)
    step_dir = store.resolve(path)
    manifest = read_manifest(step_dir)
    record = manifest.get("tokenizer")
    if not record:
        return ByteTokenizer()
    file = step_dir / record.get("file", TOKENIZER_FILE)
    what = f"{step_dir / store.MANIFEST} records tokenizer {record.get('name')}"
    data = ((manifest.get("config") or {}).get("data") or {}).get("path")
    fix = (
        f"copy {file.name} from another step of this run with the same sha256, or write it "
        "from the dataset the run trained on"
        + (f" (data.path={data}: tokenizer_of_dataset(path).to_json())" if data else "")
    )
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TokenizerError(f"{what} in {file}, which is missing; {fix}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"{what} in {file}, which is unreadable ({exc}); {fix}") from None
    if record.get("sha256") and _sha256(text) != record["sha256"]:
        raise TokenizerError(
            f"{what} with sha256 {record['sha256']}, but {file} has {_sha256(text)}; {fix}"
        )
    return from_json(text)


def write_hf_files(tokenizer, folder: str | Path) -> list[Path]:
    """tokenizer.json and tokenizer_config.json into a Hugging Face folder (AutoTokenizer,
    pipeline("text-generation") read them); returns the files written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        # NOTE: cleanup would rewrite " ." as "." and the text would not round-trip
        "clean_up_tokenization_spaces": False,
        "hpcpipe_tokenizer": tokenizer.name,
        "hpcpipe_sha256": tokenizer.digest,
    }
    out = []
    for name, text in (
        (TOKENIZER_FILE, tokenizer.to_json()),
        (HF_CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n"),
    ):
        tmp = folder / f"{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, folder / name)
        out.append(folder / name)
    return out
