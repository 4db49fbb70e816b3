"""Tests for hpcpipe.data: tokenizer, corpus, datasets, sampler, batching, CLI."""

import argparse

import h5py
import numpy as np
import pytest
import torch

from hpcpipe.data import (
    ByteTokenizer,
    Sampler,
    add_data_parser,
    dataset_main,
    default_corpus_files,
    default_corpus_text,
    load_tokens,
    make_batch,
    prepare_dataset,
    split_microbatches,
)

SMALL = 64 * 1024


def _write_texts(tmp_path):
    """Write two small real text files and return their paths."""
    a = tmp_path / "a.txt"
    b = tmp_path / "b.md"
    a.write_text("Hello, pipeline world.\nSecond line.\n", encoding="utf-8")
    b.write_text("# Überschrift\n\nnaïve café — 東京 🚀\n", encoding="utf-8")
    return a, b


def test_tokenizer_round_trip_non_ascii():
    tok = ByteTokenizer()
    text = "plain ASCII, naïve café, 東京, 🚀"
    ids = tok.encode(text)
    assert ids.dtype == np.uint8
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(torch.from_numpy(ids.astype(np.int64))) == text
    assert tok.vocab_size == 256 and tok.name == "bytes"


def test_tokenizer_decode_rejects_out_of_range_and_replaces_bad_utf8():
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="0, 255"):
        tok.decode([300])
    assert tok.decode([0xFF, ord("a")]) == "\ufffda"


def test_default_corpus_is_real_deterministic_and_capped():
    text = default_corpus_text(SMALL)
    assert text
    assert len(text.encode("utf-8")) <= SMALL
    assert "def " in text
    assert default_corpus_text(SMALL) == text
    files = default_corpus_files(SMALL)
    assert files == sorted(files, key=lambda p: p.name)
    assert all(p.suffix == ".py" for p in files)
    assert default_corpus_files(SMALL) == files


def test_default_corpus_load_tokens_matches_text():
    tokens = load_tokens(None, max_bytes=SMALL)
    assert tokens.dtype == np.uint8
    assert ByteTokenizer().decode(tokens) == default_corpus_text(SMALL)


def test_prepare_and_load_round_trip(tmp_path):
    a, b = _write_texts(tmp_path)
    out = tmp_path / "ds" / "data.h5"
    info = prepare_dataset([a, b], out)
    assert out.is_file()
    assert not list(out.parent.glob(".*tmp*"))
    tokens = load_tokens(out)
    expected = a.read_text(encoding="utf-8") + "\n\n" + b.read_text(encoding="utf-8")
    assert ByteTokenizer().decode(tokens) == expected
    assert info.num_tokens == len(tokens) == len(expected.encode("utf-8"))
    with h5py.File(out, "r") as f:
        assert f["tokens"].dtype == np.uint8
        assert f.attrs["tokenizer"] == "bytes"
        assert f.attrs["vocab_size"] == 256
        assert f.attrs["num_tokens"] == len(tokens)
        assert list(f.attrs["sources"]) == [str(a), str(b)]
        assert f.attrs["sha256"] == info.sha256


def test_prepare_directory_recurses_sorted(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "z.txt").write_text("zzz", encoding="utf-8")
    (d / "sub" / "m.py").write_text("def f(): pass", encoding="utf-8")
    (d / "skip.bin").write_bytes(b"\x00\x01")
    info = prepare_dataset([d], tmp_path / "out.h5")
    assert info.sources == (str(d / "sub" / "m.py"), str(d / "z.txt"))


def test_corrupted_tokens_error_names_file(tmp_path):
    a, b = _write_texts(tmp_path)
    out = tmp_path / "data.h5"
    prepare_dataset([a, b], out)
    with h5py.File(out, "r+") as f:
        f["tokens"][0] = f["tokens"][0] ^ 1
    with pytest.raises(ValueError, match="data.h5.*checksum"):
        load_tokens(out)


def test_missing_text_file_error_names_it(tmp_path):
    a, _ = _write_texts(tmp_path)
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        prepare_dataset([a, missing], tmp_path / "out.h5")
    assert not (tmp_path / "out.h5").exists()


def test_empty_corpus_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="empty corpus"):
        prepare_dataset([empty], tmp_path / "out.h5")
    (tmp_path / "nodocs").mkdir()
    with pytest.raises(ValueError, match="empty corpus"):
        prepare_dataset([tmp_path / "nodocs"], tmp_path / "out.h5")
    assert not (tmp_path / "out.h5").exists()


def test_load_tokens_missing_or_not_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"gone\.h5.*hpcpipe data prepare"):
        load_tokens(tmp_path / "gone.h5")
    text = tmp_path / "plain.h5"
    text.write_text("not hdf5", encoding="utf-8")
    with pytest.raises(ValueError, match=r"plain\.h5.*hpcpipe data prepare"):
        load_tokens(text)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["weights"] = np.zeros(3)
    with pytest.raises(ValueError, match=r"other\.h5.*hpcpipe data prepare"):
        load_tokens(other)


def _draw(sampler, n):
    """Return n consecutive batches of starts."""
    return [sampler.next_starts() for _ in range(n)]


def test_sampler_deterministic_and_seed_dependent():
    a = _draw(Sampler(1001, 10, 4, seed=7), 10)
    b = _draw(Sampler(1001, 10, 4, seed=7), 10)
    c = _draw(Sampler(1001, 10, 4, seed=8), 10)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    assert a[0].dtype == np.int64 and a[0].shape == (4,)


def test_sampler_covers_each_window_once_per_epoch():
    s = Sampler(1001, 10, 5, seed=0)
    assert s.num_windows == 100
    starts = np.concatenate(_draw(s, 20))
    assert sorted(starts.tolist()) == [k * 10 for k in range(100)]
    assert s.state_dict() == {"epoch": 1, "position": 0}
    second = np.concatenate(_draw(s, 20))
    assert sorted(second.tolist()) == [k * 10 for k in range(100)]
    assert not np.array_equal(starts, second)
    assert starts.max() + 10 + 1 <= 1001


def test_sampler_batches_span_epoch_boundary():
    # 10 windows, batch 4: the third batch takes 2 from epoch 0 and 2 from epoch 1.
    s = Sampler(101, 10, 4, seed=3)
    flat = np.concatenate(_draw(s, 5))
    assert sorted(flat[:10].tolist()) == list(range(0, 100, 10))
    assert sorted(flat[10:20].tolist()) == list(range(0, 100, 10))
    perm0 = np.random.default_rng((3, 0)).permutation(10) * 10
    perm1 = np.random.default_rng((3, 1)).permutation(10) * 10
    assert np.array_equal(flat[:20], np.concatenate([perm0, perm1]))
    assert s.state_dict() == {"epoch": 2, "position": 0}


@pytest.mark.parametrize("k", [0, 1, 2, 3, 7])
def test_sampler_resume_equals_uninterrupted(k):
    full = _draw(Sampler(101, 10, 4, seed=11), 12)
    first = Sampler(101, 10, 4, seed=11)
    _draw(first, k)
    resumed = Sampler(101, 10, 4, seed=11)
    resumed.load_state_dict(dict(first.state_dict()))
    rest = _draw(resumed, 12 - k)
    assert all(np.array_equal(x, y) for x, y in zip(full[k:], rest, strict=True))


@pytest.mark.parametrize("k", [0, 1, 2, 3, 7])
def test_peek_returns_the_next_batch_and_leaves_the_sampler_alone(k):
    """Across epoch boundaries too (10 windows, batch 4)."""
    full = _draw(Sampler(101, 10, 4, seed=5), k + 2)
    s = Sampler(101, 10, 4, seed=5)
    _draw(s, k)
    state = dict(s.state_dict())
    assert np.array_equal(s.peek_starts(), full[k])
    assert s.state_dict() == state
    assert np.array_equal(s.next_starts(), full[k])
    assert np.array_equal(s.next_starts(), full[k + 1])


def test_sampler_too_few_tokens_says_how_many():
    with pytest.raises(ValueError, match="need at least 41 tokens"):
        Sampler(40, 10, 4, seed=0)
    Sampler(41, 10, 4, seed=0)


def test_sampler_rejects_bad_state():
    s = Sampler(101, 10, 4, seed=0)
    with pytest.raises(ValueError, match="bad sampler state"):
        s.load_state_dict({"epoch": 0, "position": 11})


def test_make_batch_shifts_by_one():
    tokens = np.arange(50, dtype=np.uint8)
    inputs, targets = make_batch(tokens, np.array([0, 20]), 8)
    assert inputs.dtype == targets.dtype == torch.int64
    assert inputs.shape == targets.shape == (2, 8)
    assert inputs[1].tolist() == list(range(20, 28))
    assert torch.equal(targets[:, :-1], inputs[:, 1:])
    assert targets[0, -1].item() == 8
    with pytest.raises(ValueError, match="window starts"):
        make_batch(tokens, [42], 8)


def test_split_microbatches_sizes_order_and_error():
    inputs = torch.arange(8 * 3).reshape(8, 3)
    targets = inputs + 1
    parts = split_microbatches(inputs, targets, 4)
    assert len(parts) == 4
    assert all(x.shape == (2, 3) and y.shape == (2, 3) for x, y in parts)
    assert torch.equal(torch.cat([x for x, _ in parts]), inputs)
    assert torch.equal(torch.cat([y for _, y in parts]), targets)
    with pytest.raises(ValueError, match=r"batch size 8 .*M=3.*nearest valid M: 2, 4"):
        split_microbatches(inputs, targets, 3)
    with pytest.raises(ValueError, match=r"M=9.*nearest valid M: 8$"):
        split_microbatches(inputs, targets, 9)


def test_cli_prepare_files_and_default_corpus(tmp_path, capsys):
    a, b = _write_texts(tmp_path)
    out = tmp_path / "cli.h5"
    assert dataset_main(["prepare", "--out", str(out), str(a), str(b)]) == 0
    assert "tokens" in capsys.readouterr().out
    assert ByteTokenizer().decode(load_tokens(out)).startswith("Hello")
    default_out = tmp_path / "default.h5"
    argv = ["data", "prepare", "--out", str(default_out), "--default-corpus"]
    assert dataset_main([*argv, "--max-bytes", str(SMALL)]) == 0
    assert np.array_equal(load_tokens(default_out), load_tokens(None, max_bytes=SMALL))


def test_cli_errors_and_parser_wiring(tmp_path, capsys):
    assert dataset_main(["prepare", "--out", str(tmp_path / "x.h5"), "missing.txt"]) == 1
    assert "missing.txt" in capsys.readouterr().err
    assert dataset_main(["prepare", "--out", str(tmp_path / "x.h5")]) == 2
    parser = argparse.ArgumentParser(prog="hpcpipe")
    add_data_parser(parser.add_subparsers(dest="command"))
    a, _ = _write_texts(tmp_path)
    args = parser.parse_args(["data", "prepare", "--out", str(tmp_path / "y.h5"), str(a)])
    assert args.func(args) == 0
    assert (tmp_path / "y.h5").is_file()
