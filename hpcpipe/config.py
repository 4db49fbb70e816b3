"""Run configuration: TOML file + `--section.key=value` overrides -> frozen dataclasses."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from hpcpipe.models import DEFAULT_ARCH, UnknownModelError, get_spec
from hpcpipe.models.api import ModelConfig, supports_selective_recompute
from hpcpipe.models.gpt2 import GPT2Config


class ConfigError(ValueError):
    """A configuration that cannot run; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class TrainSection:
    global_batch: int = 16
    steps: int = 20
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 2
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 1234
    dtype: str = "float32"
    threads: int = 1
    device: str = "cpu"  # cpu | cuda | auto (cuda when available); one GPU per rank on a node
    log_every: int = 1
    # Stop (after checkpointing) once the step count is a multiple of this, like Megatron's
    # --exit-interval: splits a long run over several allocations. 0 = run to train.steps.
    exit_interval: int = 0
    # float16 only: dynamic loss scaling (Megatron's --initial-loss-scale, --loss-scale-window).
    # An overflowing step is skipped and the scale multiplied by loss_scale_backoff; after
    # loss_scale_window clean steps in a row it doubles.
    initial_loss_scale: float = 65536.0
    loss_scale_window: int = 1000
    loss_scale_backoff: float = 0.5


@dataclass(frozen=True)
class ParallelSection:
    pp: int = 1
    tp: int = 1
    dp: int = 1
    order: str = "dp,pp,tp"
    partition: tuple[int, ...] = ()
    balance: str = "params"
    timeout: float = 300.0
    # Launched on fewer ranks than dp*pp*tp (after a failure): re-plan instead of refusing.
    elastic: bool = False
    # ZeRO stage: 0 replicates the optimizer state on every dp rank; 1 shards the master
    # weights and AdamW moments over the dp axis (Megatron's distributed optimizer).
    zero: int = 0


RECOMPUTE_MODES = ("false", "full", "selective")
_RECOMPUTE_SPELLINGS = {
    **dict.fromkeys(("1", "true", "yes", "on", "full"), "full"),
    **dict.fromkeys(("0", "false", "no", "off", "none"), "false"),
    "selective": "selective",
}


def recompute_mode(value: Any, key: str = "schedule.recompute") -> str:
    """schedule.recompute as one of RECOMPUTE_MODES: "false", "full" or "selective".

    Accepted: the booleans (true keeps meaning "full"), 0 and 1, and the strings true/false,
    yes/no, on/off, 1/0, none, full, selective in any case. "full" recomputes each stage's
    forward in backward (the runtime keeps only stage inputs); "selective" recomputes only
    each attention core (Korthikanti et al. 2022, Megatron's --recompute-granularity
    selective; see hpcpipe.models.api.attention_core). Anything else is a ConfigError that
    names `key`, the value and the allowed modes.
    """
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return "full" if value else "false"
    if isinstance(value, str) and value.strip().lower() in _RECOMPUTE_SPELLINGS:
        return _RECOMPUTE_SPELLINGS[value.strip().lower()]
    raise ConfigError(
        f"{key} = {value!r} is not a recompute mode; use one of false (keep every activation), "
        '"full" (or true: recompute each stage\'s forward in backward) or "selective" '
        "(recompute only the attention cores)"
    )


@dataclass(frozen=True)
class ScheduleSection:
    name: str = "1f1b"
    microbatches: int = 4
    recompute: str = "false"  # one of RECOMPUTE_MODES; set through recompute_mode
    virtual: int = 1  # V: model chunks per pipeline rank (interleaved schedules)

    def __post_init__(self) -> None:
        # normalised here too, so ScheduleSection(recompute=True) also stores "full"
        object.__setattr__(self, "recompute", recompute_mode(self.recompute))


@dataclass(frozen=True)
class DataSection:
    path: str = ""
    max_bytes: int = 4 * 1024 * 1024


@dataclass(frozen=True)
class CheckpointSection:
    dir: str = "checkpoints/run"  # this run's folder: step_<N>/ shards, manifest, `latest`
    every: int = 0  # save every N optimizer steps (0: never periodically)
    keep: int = 3  # newest checkpoints kept; older ones are pruned after a successful save
    at_end: bool = False  # also save after the last step


@dataclass(frozen=True)
class DebugSection:
    # Fault injection for tests: "RANK:STEP:ACTION" raises on that world rank at that action.
    fail_at: str = ""
    # float16 tests: at this step (from 0) the loss is scaled 2**24 times more, so its
    # gradients overflow, the step is skipped and the loss scale backs off. -1: never.
    overflow_step: int = -1


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=GPT2Config)  # the model.arch family's config
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    data: DataSection = field(default_factory=DataSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    debug: DebugSection = field(default_factory=DebugSection)


SHORT_FLAGS = {
    "pp": "parallel.pp",
    "tp": "parallel.tp",
    "dp": "parallel.dp",
    "schedule": "schedule.name",
    "microbatches": "schedule.microbatches",
    "steps": "train.steps",
    "dtype": "train.dtype",
    "seed": "train.seed",
}

# The one dtype table: train.dtype names -> torch dtypes. 16-bit runs use mixed precision.
TORCH_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
DTYPES = tuple(TORCH_DTYPES)
HALF = (torch.bfloat16, torch.float16)


_SECTIONS = {
    "train": TrainSection,
    "parallel": ParallelSection,
    "schedule": ScheduleSection,
    "data": DataSection,
    "checkpoint": CheckpointSection,
    "debug": DebugSection,
}


def all_keys(arch: str = DEFAULT_ARCH) -> list[str]:
    """Every `section.key` a user can set (the [model] keys are those of `arch`'s family)."""
    model = [f"model.{f.name}" for f in fields(get_spec(arch).config_class)]
    return model + [f"{s}.{f.name}" for s, cls in _SECTIONS.items() for f in fields(cls)]


def _coerce(dotted: str, value: Any, target: Any) -> Any:
    """Convert a TOML or command-line value to the type of the field's default."""
    if dotted in _NORMALISERS:  # keys whose values are not just their default's type
        return _NORMALISERS[dotted](value, dotted)
    kind = type(target)
    try:
        if kind is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if kind is tuple:
            if isinstance(value, str):
                value = [v for v in value.replace(" ", "").split(",") if v]
            return tuple(int(v) for v in value)
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{dotted} = {value!r} is not a valid {kind.__name__} "
            f"(default {target!r}); fix the value in the config file or on the command line"
        ) from None


_NORMALISERS = {"schedule.recompute": recompute_mode}


def _parse_cli_value(text: str) -> Any:
    """Read a command-line value as TOML where possible (numbers, booleans, lists)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def build_config(tables: dict[str, Any], overrides: dict[str, Any] | None = None) -> Config:
    """Merge TOML tables and dotted overrides into a Config, rejecting unknown keys."""
    merged: dict[str, dict[str, Any]] = {s: {} for s in ("model", *_SECTIONS)}
    for section, table in tables.items():
        if section not in merged:
            raise ConfigError(f"unknown section [{section}]; valid sections: {', '.join(merged)}")
        if not isinstance(table, dict):
            raise ConfigError(f"[{section}] must be a table of keys")
        merged[section].update(table)
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        if section not in merged or not key:
            raise ConfigError(f"unknown option --{dotted}; options look like --section.key=value")
        merged[section][key] = value
    sections = {"model": model_section(merged["model"])}
    for section, cls in _SECTIONS.items():
        sections[section] = _section(section, cls(), merged[section])
    config = Config(**sections)
    check_config(config)
    return config


def _section(section: str, defaults, values: dict[str, Any], extra: str = ""):
    """`defaults` with `values` applied, each coerced to its field's type; unknown keys refused."""
    names = {f.name for f in fields(defaults)}
    for key in values:
        if key not in names:
            raise ConfigError(
                f"unknown key {section}.{key}; [{section}]{extra} accepts: "
                f"{', '.join(sorted(names))}"
            )
    coerced = {k: _coerce(f"{section}.{k}", v, getattr(defaults, k)) for k, v in values.items()}
    try:
        return dataclasses.replace(defaults, **coerced)
    except ValueError as exc:  # the family's own validation
        raise ConfigError(str(exc)) from None


def model_section(values: dict[str, Any]) -> ModelConfig:
    """The [model] table as the config of the family that model.arch names."""
    arch = str(values.get("arch") or DEFAULT_ARCH)
    try:
        spec = get_spec(arch)
    except UnknownModelError as exc:
        raise ConfigError(str(exc)) from None
    defaults = spec.config_class()
    values = {**values, "arch": arch}
    return _section("model", defaults, values, f" of model.arch={arch!r}")


def read_tables(path: str | Path | None) -> dict[str, Any]:
    """The tables of a TOML config file ({} when None)."""
    if path is None:
        return {}
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def parse_overrides(overrides: dict[str, Any] | None) -> dict[str, Any]:
    """Command-line `--section.key=value` strings read as TOML values where they parse."""
    return {
        k: _parse_cli_value(v) if isinstance(v, str) else v for k, v in (overrides or {}).items()
    }


def load_config(path: str | Path | None, overrides: dict[str, str] | None = None) -> Config:
    """Read a TOML file (or defaults when None) and apply command-line overrides."""
    return build_config(read_tables(path), parse_overrides(overrides))


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def check_config(config: Config) -> None:
    """Checks that need no MPI and no world size: same verdict on every rank."""
    m, t, p, s = config.model, config.train, config.parallel, config.schedule
    for name in ("seq_len", "vocab_size"):
        _require(getattr(m, name) >= 1, f"model.{name} must be >= 1 (got {getattr(m, name)})")
    for name in ("pp", "tp", "dp"):
        _require(getattr(p, name) >= 1, f"parallel.{name} must be >= 1 (got {getattr(p, name)})")
    axes = [a.strip() for a in p.order.split(",")]
    _require(
        sorted(axes) == ["dp", "pp", "tp"],
        f"parallel.order={p.order!r} must name dp, pp and tp once each, e.g. 'dp,pp,tp'",
    )
    _require(t.dtype in DTYPES, f"train.dtype={t.dtype!r} is not one of {', '.join(DTYPES)}")
    _require(t.steps >= 0, f"train.steps must be >= 0 (got {t.steps})")
    _require(t.global_batch >= 1, f"train.global_batch must be >= 1 (got {t.global_batch})")
    _require(s.microbatches >= 1, f"schedule.microbatches must be >= 1 (got {s.microbatches})")
    _require(s.virtual >= 1, f"schedule.virtual must be >= 1 (got {s.virtual})")
    if s.recompute == "selective":
        _require(
            supports_selective_recompute(get_spec(m.arch), m),
            f"schedule.recompute='selective' recomputes the attention cores, but no layer of "
            f"model.arch={m.arch!r} marks one (hpcpipe.models.api.attention_core); use "
            "schedule.recompute=full, or route the family's attention core through "
            "attention_core and declare `selective_recompute = False` on its module",
        )
    per_replica, rest = divmod(t.global_batch, p.dp)
    _require(
        rest == 0,
        f"train.global_batch={t.global_batch} is not divisible by parallel.dp={p.dp}",
    )
    if per_replica % s.microbatches:
        valid = [d for d in range(1, per_replica + 1) if per_replica % d == 0]
        raise ConfigError(
            f"train.global_batch={t.global_batch} / dp={p.dp} = {per_replica} sequences cannot be "
            f"cut into schedule.microbatches={s.microbatches} equal micro-batches; "
            f"valid microbatches: {valid}"
        )
    _require(
        t.device in ("cpu", "cuda", "auto"),
        f"train.device={t.device!r} must be cpu, cuda or auto",
    )
    _require(t.exit_interval >= 0, f"train.exit_interval must be >= 0 (got {t.exit_interval})")
    c = config.checkpoint
    _require(c.every >= 0, f"checkpoint.every must be >= 0 steps (got {c.every})")
    _require(c.keep >= 1, f"checkpoint.keep must be >= 1 (got {c.keep})")
    _require(p.zero in (0, 1), f"parallel.zero={p.zero} must be 0 or 1 (ZeRO stage)")
    _require(
        t.initial_loss_scale > 0 and t.loss_scale_window >= 0 and 0 < t.loss_scale_backoff < 1,
        f"train.initial_loss_scale={t.initial_loss_scale} must be > 0, train.loss_scale_window="
        f"{t.loss_scale_window} >= 0 and train.loss_scale_backoff={t.loss_scale_backoff} in (0, 1)",
    )
    _require(t.threads >= 1, f"train.threads must be >= 1 (got {t.threads})")
    _require(p.timeout > 0, f"parallel.timeout must be > 0 seconds (got {p.timeout})")
    _require(
        not config.debug.fail_at or re.fullmatch(r"\d+:\d+:\d+[A-Z_]+\d+", config.debug.fail_at),
        f"debug.fail_at={config.debug.fail_at!r} must be WORLD_RANK:STEP:ACTION, e.g. 1:0:1F2",
    )


def check_world(config: Config, world_size: int) -> None:
    """The degrees must multiply to the number of MPI processes."""
    p = config.parallel
    product = p.dp * p.pp * p.tp
    if product != world_size:
        raise ConfigError(
            f"parallel degrees dp={p.dp} x pp={p.pp} x tp={p.tp} = {product} but the job has "
            f"{world_size} MPI processes; launch with mpiexec -n {product} or change the degrees"
        )


def to_dict(config: Config) -> dict[str, dict[str, Any]]:
    """Plain nested dict (for manifests and metrics headers)."""
    return dataclasses.asdict(config)
