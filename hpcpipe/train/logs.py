"""What rank 0 tells people: the progress line's ETA, and TensorBoard event files."""

from __future__ import annotations

import importlib.util
import time
from collections import deque

from hpcpipe.config import ConfigError

TENSORBOARD_HINT = (
    "--tensorboard needs the `tensorboard` package (its event-file format is its own): "
    "pip install tensorboard, or pip install -e '.[tensorboard]'"
)


def require_tensorboard() -> None:
    """ConfigError unless `tensorboard` imports (checked on every rank, before any message)."""
    try:
        found = importlib.util.find_spec("tensorboard") is not None
    except (ImportError, ValueError):  # a broken or blocked install
        found = False
    if not found:
        raise ConfigError(TENSORBOARD_HINT)


def scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The record's numbers as TensorBoard tags: nested dicts joined with "/" (memory/total);
    booleans, None (grad_norm of a skipped step), strings and the step itself left out."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            out.update(scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, int | float) and not isinstance(value, bool) and key != "step":
            out[prefix + key] = float(value)  # nan too: a diverged loss is worth seeing
    return out


class TensorBoardLog:
    """Rank 0's TensorBoard writer: every number of each step's metrics record, at its step.

    purge_step (a resumed run's first step): TensorBoard drops the earlier run's points from
    that step on, so a run resumed from an older checkpoint draws one line, not two.
    """

    def __init__(self, log_dir: str, purge_step: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # require_tensorboard ran first; an install broken since
            raise ConfigError(f"{TENSORBOARD_HINT} ({exc})") from None
        self.writer = SummaryWriter(log_dir, purge_step=purge_step)

    def write(self, record: dict) -> None:
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, record["step"])
        self.writer.flush()  # a killed job keeps what it logged: a few bytes a step

    def close(self) -> None:
        self.writer.close()


def format_duration(seconds: float) -> str:
    """3m12s, 45s, 1h05m, 2d03h: two units at most, rounded down."""
    s = max(0, int(seconds))
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60)):
        if s >= size:
            return f"{s // size}{unit}{s % size // sub_size:02d}{sub}"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def format_seconds(seconds: float) -> str:
    """123 ms below a second, else 1.23 s."""
    return f"{seconds * 1e3:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


class Eta:
    """Remaining steps x the mean wall time of the last `window` steps.

    The wall time between two updates counts everything a step costs the run (logging,
    checkpoints, evaluation); the first update, with no earlier one, takes the step's own time.
    """

    def __init__(self, steps: int, window: int = 20, clock=time.perf_counter) -> None:
        self.steps, self.clock = steps, clock
        self.times: deque[float] = deque(maxlen=window)
        self.last: float | None = None

    def update(self, step: int, step_time: float) -> float:
        """Seconds left after `step` (of self.steps) finished, the step's own time step_time."""
        now = self.clock()
        self.times.append(step_time if self.last is None else now - self.last)
        self.last = now
        return max(0, self.steps - step) * sum(self.times) / len(self.times)
