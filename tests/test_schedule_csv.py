"""Schedules in torch's notation: F, B (a full backward), I and W (a split backward's input and
weight halves), and CSV files that torch's schedules write and read."""

import itertools
import json
import subprocess
import sys

import pytest
from test_schedule import StandIn, interleaved_valid

from hpcpipe.pipeline.schedule import (
    SCHEDULES,
    SPLIT_BACKWARD,
    Action,
    Kind,
    ScheduleError,
    build_schedule,
    from_csv,
    load_csv_schedule,
    placement_of,
    to_csv,
    uses_split_backward,
    v_placement,
    validate,
)
from hpcpipe.pipeline.simulate import Costs, simulate

A = Action.parse
# (name, K, M, V) of every schedule hpcpipe has, at shapes where each runs
SHAPES = [("gpipe", 3, 4, 1), ("gpipe", 2, 3, 2), ("1f1b", 4, 6, 1), ("interleaved", 2, 4, 2),
          ("interleaved", 3, 6, 3), ("zb-h1", 4, 8, 1), ("zb-h1", 2, 1, 1),
          ("interleaved-zb", 3, 6, 2), ("interleaved-zb", 2, 8, 3)]  # fmt: skip


def compute(schedule) -> dict:
    return {r: [str(a) for a in acts if a.is_compute] for r, acts in schedule.items()}


@pytest.mark.parametrize("name", SCHEDULES)
def test_split_schedules_write_i_and_w_and_the_others_b(name):
    for K, M in itertools.product(range(1, 5), range(1, 9)):
        V = 2 if "interleaved" in name or name == "zb-v" else 1
        if V > 1 and not interleaved_valid(K, M):
            continue
        schedule = build_schedule(name, K, M, V)
        kinds = {a.kind for acts in schedule.values() for a in acts if a.is_compute}
        split = name in SPLIT_BACKWARD
        assert kinds == ({Kind.F, Kind.I, Kind.W} if split else {Kind.F, Kind.B}), (K, M)
        assert uses_split_backward(schedule) == split


def test_a_split_backward_needs_its_w_and_a_full_one_has_none():
    no_w = build_schedule("zb-h1", 2, 2)
    no_w[1].remove(A("1W1"))
    with pytest.raises(ScheduleError, match="1W1: missing .*a split backward needs I and W"):
        validate(no_w, 2, 2)
    both = build_schedule("1f1b", 2, 2)
    both[0].append(A("0W0"))
    with pytest.raises(ScheduleError, match="0W0: microbatch 0 also has a full backward 0B0"):
        validate(both, 2, 2)
    early = build_schedule("zb-h1", 2, 2)
    early[0].remove(A("0W0"))
    early[0].insert(0, A("0W0"))
    with pytest.raises(ScheduleError, match="0W0: must come after 0I0"):
        validate(early, 2, 2)


def test_a_csv_written_before_torchs_notation_reads_as_i_and_w():
    schedule = build_schedule("interleaved-zb", 2, 4, 2)
    legacy = to_csv(schedule).replace("I", "B")  # what hpcpipe wrote before: I as B
    assert from_csv(legacy) == schedule
    full = build_schedule("1f1b", 2, 4)
    assert from_csv(to_csv(full)) == full  # a B without a W stays a full backward


def test_torch_csv_cells_that_are_not_one_action():
    # idle slots, DualPipeV's overlapped pair, and FSDP's bookkeeping actions
    text = "0F0,,(0F1;1B0)OVERLAP_F_B,0UNSHARD,0RESHARD,0REDUCE_GRAD,0I1\n"
    assert from_csv(text) == {0: [A("0F0"), A("0F1"), A("1B0"), A("0I1")]}


def stand_ins(K: int, V: int):
    """What torch's multi-stage schedules read from a stage (rank 0's, as the CSV tools do)."""
    return [StandIn(s, K, V) for s in range(0, K * V, K)]


@pytest.mark.parametrize("name, K, M, V", SHAPES)
def test_torch_loads_hpcpipes_compute_only_csv(tmp_path, name, K, M, V):
    schedules = pytest.importorskip("torch.distributed.pipelining.schedules")
    ours = build_schedule(name, K, M, V)
    path = tmp_path / "schedule.csv"
    path.write_text(to_csv(ours, compute_only=True))
    loaded = schedules.ScheduleLoopedBFS(stand_ins(K, V), M)  # its own order is replaced
    loaded._load_csv(str(path))  # torch validates: F before B or I, I before W, per stage
    theirs = {
        r: [str(a) for a in acts if a is not None] for r, acts in loaded.pipeline_order.items()
    }
    assert theirs == compute(ours)
    assert loaded.stage_index_to_group_rank == {s: s % K for s in range(K * V)}


@pytest.mark.parametrize("name, K, M, V", SHAPES)
def test_torchs_runtime_loads_hpcpipes_csv_with_its_sends_and_receives(tmp_path, name, K, M, V):
    schedules = pytest.importorskip("torch.distributed.pipelining.schedules")
    ours = build_schedule(name, K, M, V)
    path = tmp_path / "schedule.csv"
    path.write_text(to_csv(ours))
    runtime = schedules._PipelineScheduleRuntime(stand_ins(K, V), M)
    runtime._load_csv(str(path), format="compute_comms")
    loaded = runtime.pipeline_order_with_comms
    assert {r: [str(a) for a in acts] for r, acts in loaded.items()} == {
        r: [str(a) for a in acts] for r, acts in ours.items()
    }
    # NOTE: torch's _simulate() is not run: it treats a RECV as blocking until its SEND,
    # while its runtime (like hpcpipe's) posts receives early and waits at the compute that
    # uses them, which is where hpcpipe's lowering places them (one compute early)


TORCH_ORDERS = ["ScheduleLoopedBFS", "ScheduleInterleaved1F1B", "ScheduleInterleavedZeroBubble"]


@pytest.mark.parametrize("order", TORCH_ORDERS)
def test_hpcpipe_reads_and_runs_torchs_dumps(tmp_path, order):
    schedules = pytest.importorskip("torch.distributed.pipelining.schedules")
    for K, V, M in itertools.product((2, 3, 4), (2, 3), (2, 4, 8)):
        if order != "ScheduleLoopedBFS" and not interleaved_valid(K, M):
            continue
        theirs = getattr(schedules, order)(stand_ins(K, V), M)
        path = tmp_path / f"{order}-{K}-{V}-{M}.csv"
        theirs._dump_csv(str(path))
        ours = load_csv_schedule(str(path), K, M, V)  # lowered and validated
        torch_order = {
            r: [str(a) for a in acts if a is not None] for r, acts in theirs.pipeline_order.items()
        }
        assert compute(ours) == torch_order, (K, V, M)
        assert uses_split_backward(ours) == (order == "ScheduleInterleavedZeroBubble")
        assert simulate(ours, K, M, V, Costs(1, 1, 1, 0)).step_time > 0


def test_a_csv_for_another_shape_is_refused_naming_both(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text(to_csv(build_schedule("1f1b", 2, 4)))
    with pytest.raises(ScheduleError, match=r"K=2 ranks, M=4 .* but the run has pp=4"):
        load_csv_schedule(str(path), 4, 4, 1)
    with pytest.raises(ScheduleError, match="cannot read the schedule CSV"):
        load_csv_schedule(str(tmp_path / "missing.csv"), 2, 4, 1)
    path.write_text("0F0,0X0\n")
    with pytest.raises(ScheduleError, match="s.csv: cannot parse action '0X0'"):
        load_csv_schedule(str(path), 1, 1, 1)


def hpcpipe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hpcpipe", *args], capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_schedule_command_writes_and_reads_torchs_csv(tmp_path):
    split = hpcpipe("schedule", "--schedule", "zb-h1", "--stages", "2", "--microbatches", "3",
                    "--format", "csv", "--compute-only")  # fmt: skip
    assert split.returncode == 0, split.stderr
    assert split.stdout.splitlines()[1] == "1F0,1I0,1F1,1I1,1W0,1F2,1I2,1W1,1W2"  # W lag 1
    path = tmp_path / "zb.csv"
    path.write_text(split.stdout)
    shown = hpcpipe("schedule", "--csv", str(path), "--format", "json", "--costs", "1,1,1,0")
    assert shown.returncode == 0, shown.stderr
    record = json.loads(shown.stdout)
    named = json.loads(hpcpipe("schedule", "--schedule", "zb-h1", "--stages", "2",
                               "--microbatches", "3", "--format", "json").stdout)  # fmt: skip
    assert (record["K"], record["M"], record["V"]) == (2, 3, 1)
    assert record["schedule"] == named["schedule"] and record["step_time"] == named["step_time"]


def test_torchs_zbv_and_dualpipev_dumps_load_in_the_v_shape(tmp_path):
    """torch's ZBV and DualPipeV put stages r and 2K-1-r on rank r: hpcpipe reads the
    placement from the file (zb-v's order is torch's ZBV order exactly)."""
    schedules = pytest.importorskip("torch.distributed.pipelining.schedules")
    for K, M in ((2, 4), (3, 6), (4, 8)):
        stages = [StandIn(0, K, 2), StandIn(2 * K - 1, K, 2)]
        for cls in (schedules.ScheduleZBVZeroBubble, schedules.ScheduleDualPipeV):
            path = tmp_path / f"{cls.__name__}.csv"
            cls(stages, M)._dump_csv(str(path))
            loaded = load_csv_schedule(str(path), K, M, 2)
            assert placement_of(loaded, K, 2) == v_placement(K)
        zbv = load_csv_schedule(str(tmp_path / "ScheduleZBVZeroBubble.csv"), K, M, 2)
        assert compute(zbv) == compute(build_schedule("zb-v", K, M, 2))
