"""Run configuration: TOML file + `--section.key=value` overrides -> frozen dataclasses."""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import re
import textwrap
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
    """Sequences per optimizer step over all dp replicas (each replica's share is cut into
    schedule.microbatches micro-batches)."""
    steps: int = 20
    """Optimizer steps of the whole run (a resumed run continues up to this count)."""
    lr: float = 3e-3
    """Peak learning rate, reached at the end of the warm-up."""
    min_lr: float = 3e-4
    """Learning rate the cosine decay reaches at step train.steps."""
    warmup_steps: int = 2
    """Steps of linear warm-up from lr / warmup_steps up to lr (0 = none)."""
    weight_decay: float = 0.1
    """AdamW weight decay, on matrices only (not biases, norms or position tables)."""
    beta1: float = 0.9
    """AdamW's decay of the gradient's running mean."""
    beta2: float = 0.95
    """AdamW's decay of the squared gradient's running mean."""
    grad_clip: float = 1.0
    """Clip the global gradient norm (all ranks, each parameter counted once) to this; 0 = no
    clipping."""
    seed: int = 1234
    """Seeds the weights (per layer, so every layout starts alike) and the data order."""
    dtype: str = "float32"
    """float32, float64, or bfloat16 / float16 for mixed precision (16-bit model and messages,
    float32 masters and optimizer state)."""
    threads: int = 1
    """torch CPU threads per rank (torch.set_num_threads)."""
    device: str = "cpu"
    """cpu, cuda or auto (cuda when available); one GPU per rank on a node."""
    log_every: int = 1
    """Print the progress line every this many steps (the metrics file gets every step)."""
    exit_interval: int = 0
    """Checkpoint and stop once the step count is a multiple of this (Megatron's
    --exit-interval), to split a long run over several allocations; 0 = run to train.steps."""
    initial_loss_scale: float = 65536.0
    """float16 only: the dynamic loss scale to start from (Megatron's --initial-loss-scale)."""
    loss_scale_window: int = 1000
    """float16 only: clean steps in a row after which the loss scale doubles (Megatron's
    --loss-scale-window)."""
    loss_scale_backoff: float = 0.5
    """float16 only: an overflowing step is skipped and the loss scale multiplied by this."""
    eval_every: int = 0
    """Validation loss (a forward-only pass over the held-out windows) every N steps and after
    the last one; 0 = never."""
    eval_batches: int = 4
    """Global batches of held-out windows per evaluation: the same windows every time."""
    peak_tflops: float = 0.0
    """Peak TFLOP/s of one rank's device for the mfu metric; 0 = the device's known peak (A100,
    H100, H200), none on CPU."""


@dataclass(frozen=True)
class ParallelSection:
    pp: int = 1
    """Pipeline-parallel degree: K, the number of pipeline ranks."""
    tp: int = 1
    """Tensor-parallel degree: ranks splitting each layer (heads, MLP units, vocabulary)."""
    dp: int = 1
    """Data-parallel degree: model replicas, each on its share of the global batch."""
    order: str = "dp,pp,tp"
    """Nesting of the axes on the rank grid, the last varying fastest (keep tp last: a tp group
    then stays on one node)."""
    partition: tuple[int, ...] = ()
    """Layers per pipeline stage, e.g. [3, 2, 2, 1] (the embedding and the head count as
    layers); empty = balanced by parallel.balance."""
    balance: str = "params"
    """Cost the balanced partition evens out: params or flops."""
    timeout: float = 300.0
    """Seconds any wait (messages, reductions, checkpoint barriers) may take before the job
    ends naming the peer and the action."""
    elastic: bool = False
    """Launched on fewer ranks than dp x pp x tp (after a failure): re-plan the layout for the
    ranks present instead of refusing."""
    zero: int = 0
    """ZeRO stage: 0 replicates the optimizer state on every dp rank; 1 shards the master
    weights and AdamW moments over the dp axis (Megatron's distributed optimizer)."""


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
    """Pipeline schedule: gpipe, 1f1b, interleaved, zb-h1, zb-h2, interleaved-zb, zb-auto,
    zb-v (V shape, virtual = 2) or 2bw (PipeDream-2BW: no flush, two weight versions,
    microbatches >= pp - 1)."""
    microbatches: int = 4
    """M: micro-batches per step on each dp replica (must divide its share of the batch)."""
    recompute: str = "false"
    """Activation recomputation: false keeps every activation, "full" (or true) recomputes each
    stage's forward in backward, "selective" only the attention cores (RECOMPUTE_MODES)."""
    virtual: int = 1
    """V: model chunks per pipeline rank (interleaved schedules; zb-v takes 2)."""
    memory_limit: float = 1.0
    """zb-auto: micro-batches each rank may hold, as a multiple of 1F1B's peak (min(pp, M));
    2.0 is the Zero Bubble paper's ZB-2p."""
    costs: str = ""
    """zb-auto: "T_F,T_B,T_W,T_comm" of one stage per micro-batch (e.g. from `hpcpipe schedule
    --fit TRACE --format json`'s costs); "" = equal F, I and W, no comm time."""
    csv: str = ""
    """A schedule file to run instead of schedule.name's: `hpcpipe schedule --format csv`'s or
    torch's _dump_csv of its own schedules (compute order read; F, B, I, W as torch writes
    them). It must be for pp ranks, schedule.microbatches and schedule.virtual."""

    def __post_init__(self) -> None:
        # normalised here too, so ScheduleSection(recompute=True) also stores "full"
        object.__setattr__(self, "recompute", recompute_mode(self.recompute))


@dataclass(frozen=True)
class DataSection:
    path: str = ""
    """HDF5 token file from `hpcpipe data prepare`; "" = the built-in corpus (the Python
    standard library's .py sources, byte tokens)."""
    max_bytes: int = 4 * 1024 * 1024
    """Bytes of the built-in corpus to use (when data.path is "")."""
    val_fraction: float = 0.01
    """Fraction of the windows (the last ones) held out for validation, never trained on;
    ignored when data.val_path is set."""
    val_path: str = ""
    """HDF5 token file to validate on instead of holding out data.val_fraction."""


@dataclass(frozen=True)
class CheckpointSection:
    dir: str = "checkpoints/run"
    """This run's folder: step_<N>/ shards with their manifest, and `latest`."""
    every: int = 0
    """Save every N optimizer steps (0 = never periodically)."""
    keep: int = 3
    """Newest checkpoints kept; older ones are pruned after a successful save."""
    at_end: bool = False
    """Also save after the last step."""


@dataclass(frozen=True)
class DebugSection:
    fail_at: str = ""
    """Fault injection for tests: "RANK:STEP:ACTION" raises on that world rank at that action
    (e.g. 1:0:1F2)."""
    overflow_step: int = -1
    """float16 tests: at this step (from 0) the loss is scaled 2**24 times more, so its
    gradients overflow, the step is skipped and the loss scale backs off; -1 = never."""


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


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: its doc} of a config dataclass, from its source: the string literal on the
    line after each field (an attribute docstring, as simple-parsing and Sphinx read them).

    Bases are read too: a subclass's doc wins, a field it redefines without one keeps its
    base's. "" for a field without a doc (tests/test_field_docs.py requires one on every key).
    """
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):  # no source to read (a class made at run time)
            continue
        body = tree.body[0].body
        for node, after in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    return {f.name: docs.get(f.name, "") for f in fields(cls)}


def key_docs(arch: str = DEFAULT_ARCH) -> dict[str, tuple[Any, str]]:
    """{"section.key": (default, doc)} for every key of all_keys(arch), in that order."""
    sections = {"model": get_spec(arch).config_class, **_SECTIONS}
    return {
        f"{s}.{f.name}": (getattr(cls(), f.name), field_docs(cls)[f.name])
        for s, cls in sections.items()
        for f in fields(cls)
    }


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
    _require(s.memory_limit > 0, f"schedule.memory_limit must be > 0 (got {s.memory_limit})")
    if s.costs:
        from hpcpipe.pipeline.simulate import Costs

        try:
            Costs.parse(s.costs)
        except ValueError as exc:
            raise ConfigError(f"schedule.costs: {exc}") from None
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
    check_evaluation(config)
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
    _require(
        0 <= t.peak_tflops < float("inf"),
        f"train.peak_tflops must be a finite number >= 0 (0 = the device's known peak; got "
        f"{t.peak_tflops})",
    )
    _require(p.timeout > 0, f"parallel.timeout must be > 0 seconds (got {p.timeout})")
    _require(
        not config.debug.fail_at or re.fullmatch(r"\d+:\d+:\d+[A-Z_]+\d+", config.debug.fail_at),
        f"debug.fail_at={config.debug.fail_at!r} must be WORLD_RANK:STEP:ACTION, e.g. 1:0:1F2",
    )


def check_evaluation(config: Config) -> None:
    """The validation keys: a held-out split to evaluate on whenever train.eval_every is set."""
    t, d = config.train, config.data
    _require(t.eval_every >= 0, f"train.eval_every must be >= 0 steps (got {t.eval_every})")
    _require(t.eval_batches >= 1, f"train.eval_batches must be >= 1 (got {t.eval_batches})")
    _require(
        0 <= d.val_fraction < 1,
        f"data.val_fraction={d.val_fraction} must be in [0, 1) (0.01 holds out 1% of the windows)",
    )
    _require(
        not t.eval_every or d.val_fraction > 0 or bool(d.val_path),
        f"train.eval_every={t.eval_every} needs validation data: data.val_fraction > 0 (the "
        "held-out windows) or data.val_path (a token file)",
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
