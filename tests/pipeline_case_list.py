"""The pipeline cases every MPI world size runs (shared by the driver and the pytest file)."""


def cases(world: int) -> list[dict]:
    """Every schedule over several M (including M < K and M not a multiple of K), +/- recompute."""
    out = []
    for name, V, Ms in [
        ("gpipe", 1, {1, 3, world, 2 * world + 1}),
        ("1f1b", 1, {1, 3, world, 2 * world + 1}),
        ("zb-h1", 1, {1, 3, world, 2 * world + 1}),
        ("interleaved", 2, {1, 3, world, 2 * world}),
    ]:
        for M in sorted(Ms):
            for recompute in (False, True):
                out.append(
                    {"schedule": name, "virtual": V, "microbatches": M, "recompute": recompute}
                )
    return out
