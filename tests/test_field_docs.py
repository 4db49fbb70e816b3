"""Every config key is documented in one place, its field's docstring, and `--help` shows it."""

from dataclasses import dataclass

import pytest

from hpcpipe.cli.main import main
from hpcpipe.config import TrainSection, all_keys, field_docs, key_docs
from hpcpipe.models import BUILTIN, DEFAULT_ARCH, get_spec
from hpcpipe.models.api import ModelConfig

ARCHS = [*BUILTIN, "examples.own_model:spec"]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_key_has_a_doc(arch):
    docs = key_docs(arch)
    assert list(docs) == all_keys(arch)
    missing = [key for key, (_, doc) in docs.items() if not doc.strip()]
    assert not missing, (
        f"config keys without a doc: {missing}; put a string literal on the line after the "
        "field (an attribute docstring): it is the key's --help text"
    )


def test_docs_come_from_the_line_after_the_field():
    docs = field_docs(TrainSection)
    assert docs["lr"] == "Peak learning rate, reached at the end of the warm-up."
    assert "\n" not in docs["global_batch"] and "  " not in docs["global_batch"]  # one paragraph


def test_a_redefined_field_keeps_its_base_doc_unless_it_has_its_own():
    @dataclass(frozen=True)
    class Family(ModelConfig):
        arch: str = "mine"  # redefined without a doc
        seq_len: int = 8
        """My own words."""
        width: int = 3
        plain: int = 1  # a comment is not a doc

    docs = field_docs(Family)
    assert docs["arch"] == field_docs(ModelConfig)["arch"] != ""
    assert docs["seq_len"] == "My own words."
    assert docs["width"] == "" and docs["plain"] == ""


def _help(capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # the wrapping undone


def test_help_explains_every_key_with_its_default(capsys):
    text = _help(capsys)
    assert "--train.lr=VALUE default: 0.003 Peak learning rate" in text
    assert '--schedule.name=VALUE default: "1f1b" Pipeline schedule' in text
    assert "--parallel.partition=VALUE default: [] Layers per pipeline stage" in text
    assert "--checkpoint.at_end=VALUE default: false Also save after the last step." in text
    for arch in BUILTIN:
        for key, (default, doc) in key_docs(arch).items():
            if arch == DEFAULT_ARCH or key_docs(DEFAULT_ARCH).get(key) != (default, doc):
                assert f"--{key}=VALUE default: " in text and " ".join(doc.split()) in text, key
    llama = get_spec("llama").config_class()
    assert f"--model.n_kv_heads=VALUE default: {llama.n_kv_heads} Key/value heads" in text
