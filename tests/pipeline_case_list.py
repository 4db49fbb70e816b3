"""The cases each MPI world size runs (shared by the driver and the pytest files)."""

from hpcpipe.config import recompute_mode

RECOMPUTE_IDS = {"false": "", "full": "-recompute", "selective": "-selective"}

SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("zb-h1", 1), ("interleaved", 2), ("interleaved-zb", 2)]
# (dp, pp, tp) layouts beyond the pure pipeline, by world size.
LAYOUTS_3D = {2: [(2, 1, 1), (1, 1, 2)], 4: [(2, 2, 1), (1, 2, 2), (2, 1, 2)], 8: [(2, 2, 2)]}


# Llama (GQA, SwiGLU, rotary): pure pipelines at these pp, and these (dp, pp, tp) layouts.
LLAMA_PIPELINES = (2, 4)
LLAMA_LAYOUTS = {2: [(1, 1, 2)], 4: [(2, 2, 1), (1, 2, 2)], 8: [(2, 2, 2)]}


def case(name, V, M, recompute=False, layout=None, tie=True, dtype="float64", arch="gpt2", zero=0):
    return {"schedule": name, "virtual": V, "microbatches": M, "recompute": recompute,
            "layout": list(layout), "tie": tie, "dtype": dtype, "arch": arch,
            "zero": zero}  # fmt: skip


def pipeline_cases(world: int) -> list[dict]:
    """Pure pipeline (pp = world): every schedule over several M, +/- recompute."""
    out = []
    for name, V in SCHEDULES:
        Ms = {1, 3, world, 2 * world} if V > 1 else {1, 3, world, 2 * world + 1}
        for M in sorted(Ms):
            for recompute in (False, True):
                out.append(case(name, V, M, recompute, (1, world, 1)))
            if world == M:  # selective: the attention cores only
                out.append(case(name, V, M, "selective", (1, world, 1)))
    return out


def layout_cases(world: int) -> list[dict]:
    """3D layouts: every schedule, tied and untied embeddings."""
    out = []
    for layout in LAYOUTS_3D.get(world, []):
        for name, V in SCHEDULES:
            for tie in (True, False):
                out.append(case(name, V, 3, False, layout, tie))
    return out


def bf16_cases(world: int) -> list[dict]:
    """bfloat16 with dp = tp = 2: gradients accumulate and reduce in float32."""
    return [case("1f1b", 1, 2, False, (2, 1, 2), True, "bfloat16")] if world == 4 else []


# ZeRO-1 (optimizer state sharded over dp), by world size: (layout, schedules, archs, ties).
ALL_SCHEDULES = tuple(name for name, _ in SCHEDULES)
ZERO_LAYOUTS = {
    2: [((2, 1, 1), ALL_SCHEDULES, ("gpt2", "llama"), (True, False))],
    4: [((2, 2, 1), ALL_SCHEDULES, ("gpt2", "llama"), (True, False)),
        ((4, 1, 1), ("1f1b",), ("gpt2", "llama"), (True, False)),
        ((2, 1, 2), ("1f1b", "zb-h1"), ("gpt2", "llama"), (True,))],
    8: [((2, 2, 2), ALL_SCHEDULES, ("gpt2",), (True,)),
        ((2, 2, 2), ("1f1b", "interleaved-zb"), ("llama",), (True, False)),
        ((4, 2, 1), ("1f1b", "zb-h1"), ("gpt2", "llama"), (False,))],
}  # fmt: skip


def zero_cases(world: int) -> list[dict]:
    """ZeRO-1 with pp, tp, every schedule, tied and untied: equal to the serial run."""
    V_of = dict(SCHEDULES)
    out = []
    for layout, names, archs, ties in ZERO_LAYOUTS.get(world, []):
        for arch in archs:
            for name in names:
                for tie in ties:
                    out.append(case(name, V_of[name], 3, False, layout, tie, arch=arch, zero=1))
    return out


def llama_cases(world: int) -> list[dict]:
    """Llama: every schedule, tied and untied, +/- recompute; pure pipelines at M = 3 and 2K."""
    layouts = [(1, world, 1)] if world in LLAMA_PIPELINES else []
    out = []
    for layout in layouts + LLAMA_LAYOUTS.get(world, []):
        Ms = (3, 2 * world) if layout == (1, world, 1) else (3,)
        for name, V in SCHEDULES:
            for M in Ms:
                for recompute in (False, True):
                    for tie in (True, False):
                        out.append(case(name, V, M, recompute, layout, tie, arch="llama"))
            out.append(case(name, V, Ms[0], "selective", layout, True, arch="llama"))
    return out


# Schedules II (ZB-H2, zb-auto): fewer cases, so the suite stays short; the schedules' own
# structure is checked on the whole grid serially (tests/test_zero_bubble_schedules.py)
NEW_SCHEDULES = ("zb-h2", "zb-auto", "zb-v")
V_SHAPE = ("zb-v",)
NEW_LAYOUTS = {2: [(1, 2, 1)], 4: [(1, 4, 1), (2, 2, 1), (1, 2, 2)], 8: [(2, 2, 2)]}


def new_schedule_cases(world: int) -> list[dict]:
    """ZB-H2, zb-auto and ZB-V (V = 2): pipelines at M = pp and 2 pp + 1, +/- recompute;
    dp and tp at M = 3."""
    out = []
    for layout in NEW_LAYOUTS.get(world, []):
        pp = layout[1]
        pure = layout == (1, world, 1)
        for name in NEW_SCHEDULES:
            V = 2 if name in V_SHAPE else 1
            for M in (pp, 2 * pp + 1) if pure else (3,):
                for recompute in (False, True) if pure else (False,):
                    out.append(case(name, V, M, recompute, layout))
    if world == 2:  # the V shape without tied embeddings: rank 0 holds both ends untied
        out.append(case("zb-v", 2, 3, False, (1, 2, 1), tie=False))
    return out


# PipeDream-2BW: no flush, staleness 1; equal to its own oracle (SerialTrainer's W(t-1) runs).
TWO_BW_LAYOUTS = {1: [(1, 1, 1)], 2: [(1, 2, 1), (2, 1, 1)], 4: [(1, 4, 1), (2, 2, 1), (1, 2, 2)],
                  8: [(2, 2, 2)]}  # fmt: skip


def two_bw_cases(world: int) -> list[dict]:
    """2bw: pipelines at M = pp - 1 (its least), pp and 2 pp + 1, +/- full recompute; dp, tp
    and ZeRO at M = 3; untied at 2 ranks."""
    out = []
    for layout in TWO_BW_LAYOUTS.get(world, []):
        pp = layout[1]
        pure = layout == (1, world, 1)
        for M in sorted({max(1, pp - 1), pp, 2 * pp + 1}) if pure else (3,):
            for recompute in (False, True) if pure else (False,):
                out.append(case("2bw", 1, M, recompute, layout))
        if layout[0] > 1:
            out.append(case("2bw", 1, 3, False, layout, zero=1))
    if world == 2:
        out.append(case("2bw", 1, 2, "selective", (1, 2, 1), tie=False))
        out.append(case("2bw", 1, 3, False, (1, 2, 1), tie=False, arch="llama"))
    return out


def cases(world: int) -> list[dict]:
    return (pipeline_cases(world) + layout_cases(world) + llama_cases(world) + zero_cases(world)
            + new_schedule_cases(world) + two_bw_cases(world))  # fmt: skip


def case_id(c: dict) -> str:
    dp, pp, tp = c["layout"]
    arch = "" if c["arch"] == "gpt2" else f"{c['arch']}-"
    return (f"{arch}dp{dp}pp{pp}tp{tp}-{c['schedule']}-V{c['virtual']}-M{c['microbatches']}"
            f"{RECOMPUTE_IDS[recompute_mode(c['recompute'])]}{'' if c['tie'] else '-untied'}"
            f"{'-zero1' * c.get('zero', 0)}")  # fmt: skip
