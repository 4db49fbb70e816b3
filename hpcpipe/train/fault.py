"""Fault injection and stop signals: rehearse failures, and stop cleanly before a time limit.

HPCPIPE_FAULT="rank=R,step=S[,action=A][,signal=KILL|STOP]" makes world rank R kill (or stop)
itself at step S: before action A (e.g. 1F0, 2B3, 0W1), or at the step's first action, or with
action=ckpt in the middle of writing its checkpoint shard. SIGKILL is what a node failure looks
like to MPI; SIGSTOP is a hung peer (only deadlines notice it).
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

# Exit code after a stop signal: a checkpoint was written; resubmit with --resume auto.
EXIT_REQUEUE = 99
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@dataclass(frozen=True)
class FaultInjection:
    """Where one rank should die."""

    rank: int
    step: int
    action: str | None = None
    signal: str = "KILL"

    @classmethod
    def parse(cls, text: str) -> FaultInjection:
        """Read 'rank=1,step=2,action=1F0,signal=KILL'; ValueError names what is wrong."""
        fields = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            if not sep or key not in ("rank", "step", "action", "signal"):
                raise ValueError(
                    f"HPCPIPE_FAULT={text!r}: cannot read {part!r}; expected "
                    "rank=R,step=S[,action=A][,signal=KILL|STOP]"
                )
            fields[key] = value
        if "rank" not in fields or "step" not in fields:
            raise ValueError(f"HPCPIPE_FAULT={text!r} needs rank= and step=")
        sig = fields.get("signal", "KILL").upper()
        if sig not in ("KILL", "STOP"):
            raise ValueError(f"HPCPIPE_FAULT={text!r}: signal must be KILL or STOP")
        return cls(int(fields["rank"]), int(fields["step"]), fields.get("action"), sig)

    def fires(self, world_rank: int, step: int, where: str | None) -> bool:
        """Whether this rank dies here (where: an action string, 'ckpt', or None = step start)."""
        if (world_rank, step) != (self.rank, self.step):
            return False
        return where == self.action if self.action else where is None

    def fire(self) -> None:
        """Die (or freeze) the way a failed node would: no clean-up, no message to peers."""
        where = f" action {self.action}" if self.action else ""
        print(f"hpcpipe: HPCPIPE_FAULT: world rank {self.rank} {self.signal} at step {self.step}"
              f"{where}", flush=True)  # fmt: skip
        os.kill(os.getpid(), signal.SIGKILL if self.signal == "KILL" else signal.SIGSTOP)


def injection_from_env(environ=os.environ) -> FaultInjection | None:
    """The injected fault for this job, if any."""
    text = environ.get("HPCPIPE_FAULT", "").strip()
    return FaultInjection.parse(text) if text else None


class Stopped(Exception):
    """Training stopped on a signal after writing a checkpoint (exit with EXIT_REQUEUE)."""

    def __init__(self, step: int):
        super().__init__(f"stopped after checkpointing step {step}")
        self.step = step


class StopRequest:
    """Remembers a SIGTERM/SIGUSR1 until the next step boundary (handlers must not do MPI)."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def install(self) -> StopRequest:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
