"""Config: TOML + overrides -> frozen dataclasses, with errors that say how to fix them."""

from pathlib import Path

import pytest

from hpcpipe.cli.main import split_overrides
from hpcpipe.config import ConfigError, all_keys, build_config, check_world, load_config


def test_defaults_are_valid():
    config = build_config({})
    assert config.schedule.name == "1f1b"
    assert config.parallel.order == "dp,pp,tp"


def test_toml_file_and_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[model]\nn_layers = 6\n[schedule]\nname = 'gpipe'\nmicrobatches = 8\n")
    config = load_config(path, {"model.n_layers": "2", "schedule.recompute": "true"})
    assert config.model.n_layers == 2
    assert config.schedule.name == "gpipe"
    assert config.schedule.microbatches == 8
    assert config.schedule.recompute == "full"  # true keeps meaning full recomputation


def test_partition_override_parses_lists():
    assert load_config(None, {"parallel.partition": "[2, 3]"}).parallel.partition == (2, 3)
    assert load_config(None, {"parallel.partition": "2,3"}).parallel.partition == (2, 3)


@pytest.mark.parametrize(
    "tables, overrides, needle",
    [
        ({"modle": {}}, {}, "unknown section [modle]"),
        ({"model": {"layers": 2}}, {}, "unknown key model.layers"),
        ({}, {"train.steps": "many"}, "train.steps = 'many' is not a valid int"),
        ({"model": {"d_model": 10, "n_heads": 3}}, {}, "not divisible by model.n_heads=3"),
        ({"train": {"global_batch": 6}, "schedule": {"microbatches": 4}}, {}, "[1, 2, 3, 6]"),
        ({"train": {"dtype": "float8"}}, {}, "train.dtype='float8'"),
        ({"parallel": {"order": "pp,tp"}}, {}, "must name dp, pp and tp"),
    ],
)
def test_bad_values_name_the_key(tables, overrides, needle):
    with pytest.raises(ConfigError) as info:
        build_config(tables, overrides)
    assert needle in str(info.value)


def test_world_size_mismatch_names_every_degree():
    config = build_config({"parallel": {"pp": 2, "dp": 2, "tp": 2}})
    check_world(config, 8)
    with pytest.raises(ConfigError, match=r"dp=2 x pp=2 x tp=2 = 8 but the job has 4"):
        check_world(config, 4)


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_cli_overrides_both_spellings():
    rest, overrides = split_overrides(
        ["train", "--model.d_model=32", "--train.lr", "0.1", "--pp", "2"]
    )
    assert rest == ["train", "--pp", "2"]
    assert overrides == {"model.d_model": "32", "train.lr": "0.1"}


def test_every_issue_key_exists():
    keys = set(all_keys())
    for key in [
        "model.n_layers", "model.d_model", "model.n_heads", "model.seq_len", "model.vocab_size",
        "train.global_batch", "train.steps", "train.lr", "train.seed", "train.dtype",
        "parallel.pp", "parallel.tp", "parallel.dp",
        "schedule.name", "schedule.microbatches", "schedule.recompute",
    ]:  # fmt: skip
        assert key in keys


CONFIGS = Path(__file__).resolve().parent.parent / "jobs" / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_builds_its_run(path):
    """Each config in jobs/configs parses and yields a partition and schedule for its layout."""
    from hpcpipe.train.trainer import make_blueprint

    config = load_config(path)
    p = config.parallel
    blueprint = make_blueprint(config, p.dp * p.pp * p.tp)
    assert blueprint.partition.num_stages == p.pp * config.schedule.virtual
