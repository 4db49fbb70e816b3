"""Tokenizers: bytes (the default) and byte-level BPE, in datasets, checkpoints and HF exports."""

import hashlib
import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
from mpirun import ROOT, run_mpi

from hpcpipe import config as cfg
from hpcpipe import data
from hpcpipe import tokenizer as tok
from hpcpipe.checkpoint.manifest import build_manifest, write_json
from hpcpipe.config import ConfigError
from hpcpipe.train.trainer import make_blueprint

SAMPLES = [
    "plain ASCII, naïve café — 東京 🚀",
    "  leading spaces,\ttabs\r\nand\n\n\nblank lines  ",
    "def f(x):\n    return x ** 2  # squares\n",
]
VOCAB = 320


def _corpus(tmp_path):
    """A text of some variety (the README, non-ASCII lines), as one file."""
    path = tmp_path / "corpus.txt"
    path.write_text((ROOT / "README.md").read_text(encoding="utf-8") + "\n".join(SAMPLES) * 20)
    return path


def _prepare(*argv) -> int:
    return data.dataset_main(["prepare", *map(str, argv)])


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------- the tokenizers themselves


def test_byte_tokenizer_is_reexported_and_its_json_is_the_same_tokenizer():
    from tokenizers import Tokenizer

    assert data.ByteTokenizer is tok.ByteTokenizer
    b = tok.ByteTokenizer()
    library = Tokenizer.from_str(b.to_json())
    for text in [*SAMPLES, "".join(map(chr, range(1, 600)))]:
        ids = library.encode(text, add_special_tokens=False).ids
        assert ids == b.encode(text).tolist()
        assert library.decode(ids) == text == b.decode(ids)
    assert b.digest == _sha(b.to_json()) and b.name == "bytes" and b.vocab_size == 256
    assert isinstance(tok.from_json(b.to_json()), tok.ByteTokenizer)
    assert isinstance(tok.load_tokenizer("bytes"), tok.ByteTokenizer)


def test_bpe_round_trips_text_and_reloads_from_its_json(tmp_path):
    bpe = tok.BPETokenizer.train([_corpus(tmp_path).read_text()], VOCAB)
    assert bpe.name == "bpe" and bpe.vocab_size == VOCAB
    assert bpe.digest == _sha(bpe.to_json())
    for text in SAMPLES:
        ids = bpe.encode(text)
        assert ids.dtype == np.uint16 and len(ids) < len(text.encode("utf-8"))
        assert bpe.decode(ids) == text
    assert len(bpe.encode("the pipeline")) < len("the pipeline")  # merges learned
    path = tmp_path / "tok.json"
    path.write_text(bpe.to_json(), encoding="utf-8")
    again = tok.load_tokenizer(path)
    assert again.digest == bpe.digest
    assert np.array_equal(again.encode(SAMPLES[0]), bpe.encode(SAMPLES[0]))
    with pytest.raises(ValueError, match=rf"\[0, {VOCAB - 1}\]"):
        bpe.decode([VOCAB])


def test_bad_specs_say_what_to_give(tmp_path):
    with pytest.raises(tok.TokenizerError, match="at least 256"):
        tok.BPETokenizer.train(["abc"], 100)
    with pytest.raises(tok.TokenizerError, match="no such tokenizer file"):
        tok.load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(tok.TokenizerError, match="bad.json: not a `tokenizers`"):
        tok.load_tokenizer(tmp_path / "bad.json")


# ---------------------------------------------------------------- datasets


def test_prepare_bpe_stores_the_tokenizer_with_its_hash(tmp_path, capsys):
    corpus = _corpus(tmp_path)
    out = tmp_path / "bpe.h5"
    assert _prepare("--tokenizer", "bpe", "--vocab-size", VOCAB, "--out", out, corpus) == 0
    assert f"--model.vocab_size={VOCAB}" in capsys.readouterr().out
    bpe = tok.tokenizer_of_dataset(out)
    with h5py.File(out, "r") as f:
        assert f.attrs["tokenizer"] == "bpe" and f.attrs["vocab_size"] == VOCAB
        assert f.attrs["tokenizer_sha256"] == bpe.digest
    tokens = data.load_tokens(out)
    assert tokens.dtype == np.uint16 and tokens.max() < VOCAB
    assert bpe.decode(tokens) == corpus.read_bytes().decode()
    # an existing tokenizer.json gives the same tokens and the same recorded tokenizer
    (tmp_path / "tokenizer.json").write_text(bpe.to_json(), encoding="utf-8")
    again = tmp_path / "again.h5"
    assert _prepare("--tokenizer", tmp_path / "tokenizer.json", "--out", again, corpus) == 0
    assert np.array_equal(data.load_tokens(again), tokens)
    assert tok.tokenizer_of_dataset(again).digest == bpe.digest


def test_byte_default_unchanged_and_flag_errors(tmp_path, capsys):
    corpus = _corpus(tmp_path)
    out = tmp_path / "bytes.h5"
    assert _prepare("--out", out, corpus) == 0
    with h5py.File(out, "r") as f:
        assert f.attrs["tokenizer"] == "bytes" and f.attrs["vocab_size"] == 256
        assert "tokenizer" not in f  # no JSON stored for bytes
    assert isinstance(tok.tokenizer_of_dataset(out), tok.ByteTokenizer)
    assert np.array_equal(
        data.load_tokens(out), tok.ByteTokenizer().encode(corpus.read_bytes().decode())
    )
    assert tok.checkpoint_record(out) is None and tok.checkpoint_files(out) == {}
    capsys.readouterr()
    assert _prepare("--tokenizer", "bpe", "--out", out, corpus) == 2
    assert _prepare("--vocab-size", 300, "--out", out, corpus) == 2
    assert "--tokenizer bpe needs --vocab-size" in capsys.readouterr().err
    assert _prepare("--tokenizer", tmp_path / "nope.json", "--out", out, corpus) == 1
    assert "nope.json: no such tokenizer file" in capsys.readouterr().err


def test_a_corrupt_stored_tokenizer_is_detected(tmp_path):
    out = tmp_path / "bpe.h5"
    assert _prepare("--tokenizer", "bpe", "--vocab-size", 300, "--out", out, _corpus(tmp_path)) == 0
    with h5py.File(out, "a") as f:
        text = f["tokenizer"][()].decode()
        del f["tokenizer"]
        f.create_dataset("tokenizer", data=text.replace('"a"', '"A"', 1), dtype=h5py.string_dtype())
    with pytest.raises(tok.TokenizerError, match="does not match its sha256.*re-prepare"):
        tok.tokenizer_of_dataset(out)


def test_vocab_mismatch_is_a_config_error_with_both_numbers(tmp_path):
    out = tmp_path / "bpe.h5"
    assert (
        _prepare("--tokenizer", "bpe", "--vocab-size", VOCAB, "--out", out, _corpus(tmp_path)) == 0
    )
    tok.check_vocab(VOCAB, out)
    for wrong in (256, VOCAB + 64):
        with pytest.raises(ConfigError) as err:
            tok.check_vocab(wrong, out)
        message = str(err.value)
        assert f"model.vocab_size={wrong}" in message and f"vocabulary of {VOCAB}" in message
        assert f"--model.vocab_size={VOCAB}" in message and f"--vocab-size {wrong}" in message
    # through make_blueprint: what `hpcpipe train` checks on every rank before communicating
    config = cfg.build_config({}, {"data.path": str(out), "model.vocab_size": 256})
    with pytest.raises(ConfigError, match=f"model.vocab_size=256, but data.path={out}"):
        make_blueprint(config, 1)
    make_blueprint(cfg.build_config({}, {"data.path": str(out), "model.vocab_size": VOCAB}), 1)
    # bytes: a larger vocabulary is fine (a Hugging Face model fine-tuned on bytes), fewer not
    tok.check_vocab(256, None)
    tok.check_vocab(50257, None)
    with pytest.raises(ConfigError, match="model.vocab_size=100, but the built-in corpus"):
        tok.check_vocab(100, None)


def test_checkpoint_without_a_tokenizer_gives_bytes(tmp_path):
    step = tmp_path / "run" / "step_1"
    step.mkdir(parents=True)
    write_json(step / "manifest.json", build_manifest({}, 1, []))
    (tmp_path / "run" / "latest").write_text("step_1\n")
    assert isinstance(tok.tokenizer_of_checkpoint(tmp_path / "run"), tok.ByteTokenizer)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert isinstance(tok.tokenizer_of_checkpoint(hf), tok.ByteTokenizer)
    (hf / "vocab.json").write_text("{}")
    with pytest.raises(tok.TokenizerError, match="no tokenizer.json.*save_pretrained"):
        tok.tokenizer_of_checkpoint(hf)


# ---------------------------------------------------------------- end to end (MPI)


def _hpcpipe(*argv):
    return subprocess.run(
        [sys.executable, "-m", "hpcpipe", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


def test_bpe_prepare_train_checkpoint_export_decode(tmp_path):
    from transformers import PreTrainedTokenizerFast

    tokens = tmp_path / "tokens.h5"
    assert (
        _prepare("--tokenizer", "bpe", "--vocab-size", VOCAB, "--out", tokens, _corpus(tmp_path))
        == 0
    )
    run = tmp_path / "ckpt"
    args = ["-m", "hpcpipe", "train", "--pp", "2", "--steps", "2", "--schedule", "gpipe"]
    args += ["--microbatches", "2", "--model.n_layers=2", "--model.d_model=32"]
    args += ["--model.n_heads=2", "--model.seq_len=16", "--train.global_batch=4"]
    args += [f"--data.path={tokens}", f"--checkpoint.dir={run}", "--checkpoint.at_end=true"]
    proc = run_mpi(2, [*args, f"--model.vocab_size={VOCAB}"], timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    step = run / "step_2"
    manifest = json.loads((step / "manifest.json").read_text())
    trained = tok.tokenizer_of_dataset(tokens)
    assert manifest["tokenizer"] == {
        "name": "bpe", "vocab_size": VOCAB, "sha256": trained.digest, "file": "tokenizer.json"
    }  # fmt: skip
    assert manifest["attachments"] == {"tokenizer.json": trained.digest}
    assert (step / "tokenizer.json").read_text(encoding="utf-8") == trained.to_json()
    assert _hpcpipe("ckpt", "verify", run).returncode == 0

    saved = tok.tokenizer_of_checkpoint(run)
    text = SAMPLES[0] + "\n" + SAMPLES[1]
    ids = saved.encode(text)
    assert saved.digest == trained.digest and saved.decode(ids) == text

    hf = tmp_path / "hf"
    proc = _hpcpipe("ckpt", "export", run, "--format", "hf", "--out", hf)
    assert proc.returncode == 0, proc.stderr
    assert "tokenizer.json (bpe, vocab 320)" in proc.stdout
    fast = PreTrainedTokenizerFast(tokenizer_file=str(hf / "tokenizer.json"))
    assert fast.decode(ids.tolist()) == text
    assert fast(text)["input_ids"] == ids.tolist()
    assert json.loads((hf / "config.json").read_text())["vocab_size"] == VOCAB
    assert tok.tokenizer_of_checkpoint(hf).digest == trained.digest

    # `generate --prompt` encodes with the checkpoint's BPE (the same continuation as the
    # prompt's ids) and decodes the new ids to their text
    prompt = "The pipeline"
    encoded = ",".join(str(i) for i in saved.encode(prompt))
    proc = _hpcpipe("generate", "--checkpoint", run, "--prompt", prompt, "--tokens", encoded,
                    "--max-new-tokens", 6, "--format", "json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    by_text, by_ids = [json.loads(line) for line in proc.stdout.splitlines()]
    assert by_text["tokens"] == by_ids["tokens"] and len(by_text["tokens"]) == 6
    assert by_text["text"] == saved.decode(by_text["tokens"]) == fast.decode(by_text["tokens"])

    # a missing tokenizer file the manifest names: a clear error everywhere it is read
    (step / "tokenizer.json").unlink()
    with pytest.raises(tok.TokenizerError) as err:
        tok.tokenizer_of_checkpoint(run)
    assert "records tokenizer bpe" in str(err.value) and "which is missing" in str(err.value)
    assert f"data.path={tokens}" in str(err.value)
    proc = _hpcpipe("ckpt", "verify", step)
    assert proc.returncode == 1 and "tokenizer.json: attachment missing" in proc.stdout
    proc = _hpcpipe("ckpt", "export", step, "--format", "hf", "--out", tmp_path / "hf2")
    assert proc.returncode == 1 and "tokenizer.json, which is missing" in proc.stderr
    assert not (tmp_path / "hf2").exists()


def test_train_refuses_a_vocab_mismatch_on_every_rank(tmp_path):
    tokens = tmp_path / "tokens.h5"
    assert (
        _prepare("--tokenizer", "bpe", "--vocab-size", VOCAB, "--out", tokens, _corpus(tmp_path))
        == 0
    )
    args = ["-m", "hpcpipe", "train", "--pp", "2", f"--data.path={tokens}"]
    proc = run_mpi(2, args, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    message = f"model.vocab_size=256, but data.path={tokens} was tokenized by bpe"
    assert proc.stderr.count(message) == 2
