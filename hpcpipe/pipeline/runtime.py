"""The one interpreter that executes a rank's pipeline actions (any schedule) for one step."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from hpcpipe.parallel.p2p import P2P, Transfer, make_tag
from hpcpipe.pipeline.schedule import Action, Kind
from hpcpipe.pipeline.zero_bubble import WeightGradStore

FORWARD, BACKWARD = 0, 1


class ActionError(RuntimeError):
    """An action failed; the message names the rank, step, action and this rank's program."""


@dataclass
class StepResult:
    """What one rank measured in one step."""

    loss: float  # sum over micro-batches of loss/M (only the last stage has a non-zero value)
    busy_seconds: float  # time inside forward/backward compute
    wait_seconds: float  # time blocked on peers
    peak_activations: int  # most micro-batches whose activations were held at once
    peak_activation_bytes: int = 0  # memory_meter's peak over the step (0 without a meter)


@dataclass
class _MicroState:
    """What one (stage, micro-batch) keeps between its forward and its backward."""

    inputs: torch.Tensor | None = None
    outputs: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    input_grad: torch.Tensor | None = None
    recv_input: Transfer | None = None  # posted by RECV_F
    recv_grad: Transfer | None = None  # posted by RECV_B
    weight_work: list | None = None  # deferred weight gradients (split backward), run by W
    memory: list | None = None  # memory_meter holds (input, what W needs): until released
    memory_output: object | None = None  # memory_meter hold of the output: until B


@dataclass
class PipelineRuntime:
    """Executes `actions` over the local stage modules, talking to peers through `p2p`.

    stages maps GLOBAL stage index -> module for the chunks this rank holds; num_stages is the
    total over all ranks (K * V); stage s lives on pipeline rank placement[s] (default round
    robin, s % K).
    """

    stages: dict[int, nn.Module]
    actions: Sequence[Action]
    num_stages: int
    pp_size: int
    p2p: P2P | None
    activation_shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    # "false" | "full" | "selective" (config.recompute_mode); legacy bools: True = "full".
    # Only "full" changes what the runtime does (keep stage inputs, rerun forward in backward);
    # "selective" lives in the stage modules (models.api.enable_selective_recompute).
    recompute: bool | str = False
    fail_at: str | None = None  # "STEP:ACTION" to raise there (fault-injection tests)
    weight_store: WeightGradStore | None = None  # set: B computes input grads, W weight grads
    step_index: int = 0
    trace: list | None = None  # when a list: (action, start, end) of every action, perf_counter
    fault_injection: object | None = (
        None  # fault.FaultInjection (HPCPIPE_FAULT) and this rank's world rank
    )
    world_rank: int = 0
    # train.memory.SavedTensorMeter: counts every tensor saved in a stage forward and what the
    # runtime keeps per micro-batch; StepResult.peak_activation_bytes is its peak
    memory_meter: object | None = None
    # Evaluation (a forward-only schedule): F runs under no_grad and keeps nothing for a
    # backward; its input is freed at once, its output as soon as it is sent or consumed.
    forward_only: bool = False
    # the schedule's placement_of (None: round robin); the V shape puts stage 2K-1-r on rank r
    placement: Sequence[int] | None = None
    # 2BW (hpcpipe.pipeline.twobw): the modules (the other weight version) that run the next
    # batch's forwards, micro-batches >= M of a step; see step(lookahead=...)
    next_stages: dict[int, nn.Module] | None = None

    def __post_init__(self):
        self.carried: dict[tuple[int, int], _MicroState] = {}  # 2BW: into the next step

    def rank_of(self, stage: int) -> int:
        """Pipeline rank that holds a global stage (a stage outside 0..num_stages-1 is a bug)."""
        if not 0 <= stage < self.num_stages:  # placement[-1] would silently name a real rank
            raise IndexError(f"stage {stage} is outside 0..{self.num_stages - 1}")
        return self.placement[stage] if self.placement is not None else stage % self.pp_size

    @property
    def _full_recompute(self) -> bool:
        """Whether this runtime recomputes whole stages (mode "full", or the legacy True)."""
        mode = self.recompute
        if mode is True or mode == "full":
            return True
        if mode in (False, None, "false", "selective"):
            return False
        raise ValueError(
            f"PipelineRuntime.recompute={mode!r} is not one of False, 'false', 'full', "
            "'selective' (normalise config values with hpcpipe.config.recompute_mode)"
        )

    def step(
        self,
        microbatches: Sequence[tuple[torch.Tensor | None, torch.Tensor | None]],
        lookahead: Sequence[tuple[torch.Tensor | None, torch.Tensor | None]] | None = None,
    ):
        """Run every action once for these (inputs, targets) micro-batches; gradients accumulate.

        lookahead (2BW): the next batch's micro-batches. Actions on micro-batch M + j run its
        j-th one on next_stages, and whatever they leave (forward state, posted receives) is
        carried into the next step as micro-batch j. Without it nothing outlives the step.
        """
        self._micro = [*microbatches, *(lookahead or ())]
        self._m = len(microbatches)
        self._state = self.carried  # the previous step's early forwards, renumbered
        self.carried = {}
        self._held = self._peak = sum(st.inputs is not None for st in self._state.values())
        self._busy = 0.0
        self._loss = torch.zeros((), dtype=torch.float64)
        meter = self.memory_meter
        if meter is not None:  # parameters, buffers and the token batch are no activations
            modules = [*self.stages.values(), *(self.next_stages or {}).values()]
            meter.ignore(t for stage in modules for t in stage.parameters())
            meter.ignore(t for stage in modules for t in stage.buffers())
            meter.ignore(t for pair in self._micro for t in pair)
            meter.reset()
        waited_before = self.p2p.wait_seconds if self.p2p else 0.0
        for index, action in enumerate(self.actions):
            try:
                self._inject(action)
                self._compute_start = time.perf_counter()
                self._run(action)
                if self.trace is not None:
                    self.trace.append((action, self._compute_start, time.perf_counter()))
            except Exception as exc:
                raise ActionError(self._describe_failure(index, action, exc)) from exc
        if self.p2p:
            self.p2p.flush()
        if lookahead is not None:
            M = self._m
            self.carried = {(s, m - M): st for (s, m), st in self._state.items() if m >= M}
        waited = (self.p2p.wait_seconds if self.p2p else 0.0) - waited_before
        self.step_index += 1
        peak_bytes = meter.peak if meter is not None else 0
        return StepResult(float(self._loss), self._busy, waited, self._peak, peak_bytes)

    # --- one action ---------------------------------------------------------------------------

    def _run(self, action: Action) -> None:
        handler = _HANDLERS.get(action.kind)
        if handler is None:
            raise NotImplementedError(f"action kind {action.kind.value} is not executable yet")
        handler(self, action.stage, action.microbatch)

    def _st(self, stage: int, mb: int) -> _MicroState:
        return self._state.setdefault((stage, mb), _MicroState())

    def _is_last(self, stage: int) -> bool:
        return stage == self.num_stages - 1

    def _forward_input(self, stage: int, mb: int) -> torch.Tensor:
        """Tokens on the first stage; otherwise the previous stage's output as a leaf."""
        if stage == 0:
            return self._micro[mb][0].to(self.device)
        if self.rank_of(stage - 1) == self.rank_of(stage):
            upstream = self._state[(stage - 1, mb)].outputs
        else:
            transfer = self._st(stage, mb).recv_input
            if transfer is None:
                raise RuntimeError(f"no receive was posted for the input of {stage}F{mb}")
            upstream = self.p2p.wait(transfer)
        return upstream.detach().requires_grad_()

    def _stage_forward(self, stage: int, mb: int, inputs: torch.Tensor) -> torch.Tensor:
        """Module forward, plus the scaled loss on the last stage (counted by memory_meter)."""
        meter = self.memory_meter
        modules = self.next_stages if mb >= self._m and self.next_stages else self.stages
        with meter if meter is not None else contextlib.nullcontext():
            out = modules[stage](inputs)
            if self._is_last(stage):
                target = self._micro[mb][1].to(self.device)
                out = self.loss_fn(out, target) / self._m
        if meter is not None:
            self._hold(meter, stage, mb, inputs, out)
        return out

    def _hold(self, meter, stage: int, mb: int, inputs: torch.Tensor, out: torch.Tensor) -> None:
        """The micro-batch keeps its input until released, its output (with grad) until B."""
        st = self._st(stage, mb)
        st.memory = [*(st.memory or ()), meter.hold(inputs)]
        if torch.is_grad_enabled():  # a no-grad forward's output is sent or passed on
            st.memory_output = meter.hold(out)

    def _forward(self, stage: int, mb: int) -> None:
        if self.forward_only:
            return self._forward_no_grad(stage, mb)
        st = self._st(stage, mb)
        st.inputs = self._forward_input(stage, mb)
        start = self._compute_start = time.perf_counter()  # after any wait for the input
        # NOTE: the model has no dropout, so recomputation needs no saved RNG state.
        with torch.set_grad_enabled(not self._full_recompute):
            out = self._stage_forward(stage, mb, st.inputs)
        if self._is_last(stage):
            st.loss = out
            self._loss += out.detach().double().cpu()
        else:
            st.outputs = out
        self._held += 1
        self._peak = max(self._peak, self._held)
        self._busy += time.perf_counter() - start

    def _forward_no_grad(self, stage: int, mb: int) -> None:
        """Forward-only F: no graph; at most one micro-batch held (this one, until sent)."""
        st = self._st(stage, mb)
        if stage == 0:
            inputs = self._micro[mb][0].to(self.device)
        elif self.rank_of(stage - 1) == self.rank_of(stage):
            upstream = self._state.pop((stage - 1, mb))  # handed over to this stage
            inputs, upstream.outputs = upstream.outputs, None
            self._release(upstream)
        else:
            if st.recv_input is None:
                raise RuntimeError(f"no receive was posted for the input of {stage}F{mb}")
            inputs = self.p2p.wait(st.recv_input)
        start = self._compute_start = time.perf_counter()  # after any wait for the input
        with torch.no_grad():
            out = self._stage_forward(stage, mb, inputs)
        del inputs
        if st.recv_input is not None:  # the input is used up: its buffer goes back to the pool
            self.p2p.release(st.recv_input)
            st.recv_input = None
        self._held += 1
        self._peak = max(self._peak, self._held)
        if self._is_last(stage):
            self._loss += out.double().cpu()
            self._release(self._state.pop((stage, mb)))
        else:
            st.outputs = out  # until SEND_F (or the next local stage's F) takes it
        self._busy += time.perf_counter() - start

    def _output_grad(self, stage: int, mb: int) -> torch.Tensor | None:
        """Gradient of this stage's output: from the next stage, local or remote."""
        if self._is_last(stage):
            return None
        if self.rank_of(stage + 1) == self.rank_of(stage):
            return self._state[(stage + 1, mb)].input_grad
        transfer = self._st(stage, mb).recv_grad
        if transfer is None:
            raise RuntimeError(f"no receive was posted for the output gradient of {stage}B{mb}")
        return self.p2p.wait(transfer)

    def _backward(self, stage: int, mb: int) -> None:
        st = self._state.get((stage, mb))
        if st is None or st.inputs is None:
            raise RuntimeError(f"{stage}B{mb} runs before {stage}F{mb}")
        grad = self._output_grad(stage, mb)
        start = self._compute_start = time.perf_counter()  # after any wait for the gradient
        if self._full_recompute:
            with torch.enable_grad():
                out = self._stage_forward(stage, mb, st.inputs)
        else:
            out = st.loss if self._is_last(stage) else st.outputs
        split = self.weight_store is not None
        if split:
            self.weight_store.begin()
        try:
            torch.autograd.backward(out, grad)
        finally:
            if split:
                st.weight_work = self.weight_store.end()
        self._busy += time.perf_counter() - start
        st.input_grad = st.inputs.grad if stage > 0 else None
        st.outputs = st.loss = None
        st.memory_output = None
        if split and self.memory_meter is not None:  # what W needs stays until W
            held = self.memory_meter.hold_closures(st.weight_work, st.inputs.grad)
            st.memory = [*(st.memory or ()), held]
        self._drop_next_input_grad(stage, mb)
        if not split:
            self._release(st)

    def _weight_backward(self, stage: int, mb: int) -> None:
        """W: the weight gradients that B deferred, then free the micro-batch."""
        st = self._state.get((stage, mb))
        if st is None or st.weight_work is None:
            raise RuntimeError(f"{stage}W{mb} runs before {stage}B{mb} (or without split backward)")
        start = time.perf_counter()
        for work in st.weight_work:
            work()
        self._busy += time.perf_counter() - start
        st.weight_work = None
        self._release(st)

    def _drop_next_input_grad(self, stage: int, mb: int) -> None:
        """The local next stage's input gradient has been consumed."""
        if self._is_last(stage):
            return
        if self.rank_of(stage + 1) == self.rank_of(stage) and (stage + 1, mb) in self._state:
            self._state[(stage + 1, mb)].input_grad = None

    def _release(self, st: _MicroState) -> None:
        """The micro-batch is done here: its received buffers go back to the pool."""
        for transfer in (st.recv_input, st.recv_grad):
            if transfer is not None:
                self.p2p.release(transfer)
        st.recv_input = st.recv_grad = None
        st.inputs = None
        st.memory = None
        self._held -= 1

    # --- communication ------------------------------------------------------------------------

    def _tag(self, mb: int, dest_stage: int, direction: int) -> int:
        return make_tag(mb, dest_stage, direction, self.num_stages, self.p2p.tag_ub)

    def _send_forward(self, stage: int, mb: int) -> None:
        st = self._st(stage, mb)
        dest = stage + 1
        self.p2p.isend(st.outputs, self.rank_of(dest), self._tag(mb, dest, FORWARD))
        if self.forward_only:  # p2p keeps the tensor alive until the send completes
            st.outputs = None
            self._release(self._state.pop((stage, mb)))
        elif self._full_recompute:
            st.outputs = None  # backward recomputes it

    def _send_backward(self, stage: int, mb: int) -> None:
        st = self._st(stage, mb)
        dest = stage - 1
        self.p2p.isend(st.input_grad, self.rank_of(dest), self._tag(mb, dest, BACKWARD))
        st.input_grad = None

    def _post_recv(self, stage: int, mb: int, peer_stage: int, direction: int, what: str):
        return self.p2p.irecv(
            self.activation_shape,
            self.dtype,
            self.device,
            self.rank_of(peer_stage),
            self._tag(mb, stage, direction),
            what,
        )

    def _recv_forward(self, stage: int, mb: int) -> None:
        self._st(stage, mb).recv_input = self._post_recv(
            stage, mb, stage - 1, FORWARD, f"the input activation of {stage}F{mb}"
        )

    def _recv_backward(self, stage: int, mb: int) -> None:
        self._st(stage, mb).recv_grad = self._post_recv(
            stage, mb, stage + 1, BACKWARD, f"the output gradient of {stage}B{mb}"
        )

    # --- failures -----------------------------------------------------------------------------

    def _inject(self, action: Action) -> None:
        if self.fail_at and self.fail_at == f"{self.step_index}:{action}":
            raise RuntimeError(f"injected failure (debug.fail_at) at step {self.step_index}")
        injection = self.fault_injection
        if injection is not None:
            step = self.step_index + 1  # HPCPIPE_FAULT counts steps as printed, from 1
            first = action is self.actions[0]
            if injection.fires(self.world_rank, step, str(action)) or (
                first and injection.fires(self.world_rank, step, None)
            ):
                injection.fire()

    def _describe_failure(self, index: int, action: Action, exc: Exception) -> str:
        program = " ".join(f"[{a}]" if i == index else str(a) for i, a in enumerate(self.actions))
        pp_rank = self.rank_of(action.stage)
        return (
            f"pipeline rank {pp_rank} failed at step {self.step_index}, action {action} "
            f"(#{index} of {len(self.actions)}): {type(exc).__name__}: {exc}\n"
            f"  this rank's actions: {program}"
        )


# One handler per action kind (built once, not per action).
_HANDLERS = {
    Kind.F: PipelineRuntime._forward,
    Kind.B: PipelineRuntime._backward,
    Kind.I: PipelineRuntime._backward,  # split by the weight store: W follows
    Kind.W: PipelineRuntime._weight_backward,
    Kind.SEND_F: PipelineRuntime._send_forward,
    Kind.RECV_F: PipelineRuntime._recv_forward,
    Kind.SEND_B: PipelineRuntime._send_backward,
    Kind.RECV_B: PipelineRuntime._recv_backward,
}
