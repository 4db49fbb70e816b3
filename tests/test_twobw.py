"""PipeDream-2BW: the schedule's structure (serial) and the oracle's staleness-1 semantics.

The MPI runs equal to this oracle are in tests/test_pipeline_mpi.py (pipeline_case_list's
two_bw_cases); its checkpoint resume in tests/test_resume_mpi.py.
"""

import pytest
import torch

from hpcpipe.config import build_config
from hpcpipe.pipeline import twobw
from hpcpipe.pipeline.schedule import (
    Action,
    Kind,
    ScheduleError,
    add_send_recv,
    build_schedule,
    compute_1f1b,
)
from hpcpipe.train.serial import SerialTrainer

GRID = [(K, M) for K in range(1, 9) for M in range(max(1, K - 1), 33)]


@pytest.mark.parametrize("K", range(1, 9))
def test_every_step_validates_for_up_to_8_ranks_and_32_microbatches(K):
    for M in range(max(1, K - 1), 33):
        step = build_schedule("2bw", K, M)  # three unrolled steps validated, sends matched
        assert step == twobw.steady_step(K, M)


@pytest.mark.parametrize("K, M", [(K, M) for K, M in GRID if M <= 2 * K + 1])
def test_steps_in_a_row_are_1f1b_over_their_batches_without_the_flushes(K, M):
    """The warm-up and three steps compute in exactly 1F1B's order over 3M micro-batches
    (2BW is 1F1B never drained, so its deadlock freedom is 1F1B's), and the first two batches'
    comm sits where 1F1B's does (the third's last receive moves: 1F1B drains there)."""
    ours, theirs = twobw.unrolled(K, M, 3), add_send_recv(compute_1f1b(K, 3 * M), K)
    start, step = twobw.warmup(K, M), twobw.steady_step(K, M)
    for rank in range(K):
        assert [a for a in ours[rank] if a.is_compute] == compute_1f1b(K, 3 * M)[rank]
        chained = start[rank] + [a for t in range(3) for a in twobw.renumber(step[rank], t * M)]
        early = [a for a in chained if a.microbatch < 2 * M]
        assert early == [a for a in theirs[rank] if a.microbatch < 2 * M]


@pytest.mark.parametrize("K, M", [(4, 3), (4, 4), (3, 7), (8, 7), (1, 1)])
def test_a_step_runs_M_forwards_and_backwards_the_next_batchs_first_w_r_among_them(K, M):
    for rank, actions in twobw.steady_step(K, M).items():
        w = twobw.early_forwards(K, rank)
        forwards = [a.microbatch for a in actions if a.kind == Kind.F]
        backwards = [a.microbatch for a in actions if a.kind == Kind.B]
        assert forwards == list(range(w, M + w))  # >= M: the next batch's 0..w-1
        assert backwards == list(range(M))
        assert {a.stage for a in actions} == {rank}


@pytest.mark.parametrize("K, M", [(2, 1), (4, 3), (4, 9), (8, 7)])
def test_each_step_posts_the_receive_of_every_message_it_sends(K, M):
    assert twobw.unmatched_sends(twobw.steady_step(K, M)) == []
    assert twobw.unmatched_sends(twobw.first_step(K, M)) == []
    # The last RECV_F of a step is the next step's first forward's: without it, its send waits.
    step = twobw.steady_step(K, M)
    assert step[1][-3] == Action(1, Kind.RECV_F, M + twobw.early_forwards(K, 1))
    cut = {r: [a for a in acts if a != step[1][-3]] for r, acts in step.items()}
    assert twobw.unmatched_sends(cut) == [(0, Action(0, Kind.SEND_F, M + K - 2))]


def test_the_peak_is_1f1bs_with_the_next_batch_counted():
    assert twobw.peak_activations(4, 3) == {0: 4, 1: 3, 2: 2, 3: 1}  # rank 0: M + 1 at M = K-1
    assert twobw.peak_activations(4, 9) == {0: 4, 1: 3, 2: 2, 3: 1}


def test_bad_sizes_are_refused_with_the_fix():
    with pytest.raises(ScheduleError, match=r"microbatches >= pp - 1 = 3 \(got M=2\)"):
        build_schedule("2bw", 4, 2)
    with pytest.raises(ScheduleError, match="2bw supports only V=1"):
        build_schedule("2bw", 2, 4, 2)


# ---------------------------------------------------------------- the oracle


def config(name: str):
    return build_config(
        {
            "model": {"n_layers": 2, "d_model": 16, "n_heads": 2, "seq_len": 8},
            "train": {"global_batch": 4, "steps": 4, "dtype": "float64", "lr": 1e-2,
                      "warmup_steps": 1, "seed": 3},
            "schedule": {"name": name, "microbatches": 2},
        }
    )  # fmt: skip


def grads_of(trainer) -> dict:
    trainer.forward_backward()
    return trainer.grads()


def test_the_oracle_takes_step_ts_gradient_on_the_weights_before_the_last_update():
    """W(t+1) = W(t) - step(grad on W(t-1)), W(-1) = W(0): step 0 is a plain step; step 1's
    gradient is batch 1's at W(0), which a fresh synchronous trainer computes independently."""
    stale, sync = SerialTrainer(config("2bw")), SerialTrainer(config("1f1b"))
    first = grads_of(stale)
    assert all(torch.equal(first[n], g) for n, g in grads_of(sync).items())
    stale.finish_step()
    sync.finish_step()
    at_w0 = SerialTrainer(config("1f1b"))
    at_w0.sampler.next_starts()  # batch 1, on the untrained weights
    expected = grads_of(at_w0)
    second = grads_of(stale)
    assert all(torch.equal(second[n], g) for n, g in expected.items())
    moved = grads_of(sync)  # the synchronous step 1 sees W(1): a different gradient
    assert any(not torch.allclose(moved[n], g) for n, g in second.items())
    # The update applies to W(1), not to W(0): the stale run's weights stay W(1) + its step.
    before = stale.params()
    stale.finish_step()
    assert any(not torch.equal(before[n], p) for n, p in stale.params().items())


# ---------------------------------------------------------------- simulated


@pytest.mark.parametrize("K", range(2, 9))
def test_a_full_2bw_pipeline_has_no_bubble_and_beats_1f1b(K):
    """Unit costs: a step once the pipe is full takes M (T_F + T_B), against 1F1B's
    (M + K - 1)(T_F + T_B); with comm time (the costs fitted on this machine) still faster."""
    from hpcpipe.pipeline.simulate import Costs, predict

    fitted = Costs(70.1, 86.4 + 62.1, 0.0, 0.46)
    for M in range(K - 1, 2 * K + 2):
        step, bubble, _ = twobw.steady_state(K, M, Costs(1.0, 1.0, 0.0, 0.0))
        assert step == pytest.approx(2 * M) and bubble == pytest.approx(0, abs=1e-12)
        step, bubble, _ = twobw.steady_state(K, M, fitted)
        assert step < predict("1f1b", K, M, 1, fitted).step_time
        assert bubble < 0.02
