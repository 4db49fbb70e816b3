"""`hpcpipe schedule`: every format, costs, and refusal messages (no MPI)."""

import json

import pytest

from hpcpipe.cli.main import main
from hpcpipe.pipeline.schedule import from_csv


def run(capsys, *argv):
    code = main(["schedule", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(
    "name, V, expected",
    [("gpipe", 1, 3 / 11), ("1f1b", 1, 3 / 11), ("interleaved", 2, 3 / 19)],
)
def test_json_has_bubble_step_time_and_peaks(capsys, name, V, expected):
    code, out, _ = run(
        capsys, "--schedule", name, "--stages", "4", "--microbatches", "8",
        "--virtual", str(V), "--costs", "1,1,0,0", "--format", "json",
    )  # fmt: skip
    assert code == 0
    data = json.loads(out)
    assert data["bubble_rate"] == pytest.approx(expected, rel=1e-12)
    assert len(data["peak_activations"]) == 4 and data["step_time"] > 0


def test_zb_h1_idle_is_a_third_of_1f1b(capsys):
    results = {}
    for name in ("1f1b", "zb-h1"):
        _, out, _ = run(capsys, "--schedule", name, "--stages", "4", "--microbatches", "8",
                        "--costs", "1,1,1,0", "--format", "json")  # fmt: skip
        data = json.loads(out)
        results[name] = data["step_time"] - 8 * 3, max(data["peak_activations"])
    assert results["1f1b"] == (9, 4)
    assert results["zb-h1"] == (3, 4)


def test_csv_round_trips(capsys):
    _, out, _ = run(capsys, "--stages", "3", "--microbatches", "5", "--format", "csv")
    schedule = from_csv(out)
    assert sorted(schedule) == [0, 1, 2]


def test_chrome_trace_rows(capsys):
    _, out, _ = run(capsys, "--stages", "2", "--microbatches", "2", "--format", "chrome")
    events = json.loads(out)["traceEvents"]
    assert sum(e["ph"] == "X" for e in events) == 2 * 2 * 2


def test_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "zb.png"
    code, _, _ = run(capsys, "--schedule", "zb-h1", "--stages", "4", "--microbatches", "8",
                     "--format", "png", "--out", str(path))  # fmt: skip
    assert code == 0 and path.stat().st_size > 1000


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--schedule", "interleaved", "--stages", "4", "--microbatches", "9", "--virtual",
          "2"], "use M=8 or M=10"),
        (["--stages", "2", "--microbatches", "4", "--costs", "a,b"], "costs"),
        (["--stages", "2"], "--microbatches are required"),
    ],
)  # fmt: skip
def test_refusals_say_why(capsys, argv, needle):
    code, _, err = run(capsys, *argv)
    assert code == 2 and needle in err


def test_2bw_prints_its_step_and_its_full_pipelines_time_per_step(capsys):
    """2BW never drains: json's step_time is what one more step adds (M (T_F + T_B) at unit
    costs: no bubble), the grid shows three steps in a row, csv the program of every step."""
    common = ("--schedule", "2bw", "--stages", "4", "--microbatches", "8")
    code, out, _ = run(capsys, *common, "--costs", "1,1,1,0", "--format", "json")
    data = json.loads(out)
    assert code == 0 and data["steps_shown"] == 3
    assert data["step_time"] == pytest.approx(8 * 3) and data["bubble_rate"] == pytest.approx(0)
    assert data["peak_activations"] == [4, 3, 2, 1]
    _, grid, _ = run(capsys, *common, "--format", "grid")
    assert "0F23" in grid and "3B23" in grid and "0F24" not in grid
    _, csv, _ = run(capsys, *common, "--format", "csv", "--compute-only")
    step = from_csv(csv)
    assert [str(a) for a in step[0][:4]] == ["0F3", "0B0", "0F4", "0B1"]
    assert max(a.microbatch for a in step[0]) == 10  # the next batch's first K-1 forwards
