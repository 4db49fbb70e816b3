"""Grid arithmetic: rank <-> (dp, pp, tp) exactly as MPI_Cart_create lays it out."""

import itertools

import pytest

from hpcpipe.parallel.grid import Topology

LAYOUTS = [(1, 1, 1), (1, 4, 1), (2, 2, 2), (2, 3, 4), (8, 16, 8), (3, 1, 5)]
ORDERS = [("dp", "pp", "tp"), ("tp", "pp", "dp"), ("pp", "dp", "tp")]


@pytest.mark.parametrize("dp, pp, tp", LAYOUTS)
@pytest.mark.parametrize("order", ORDERS)
def test_rank_and_coords_are_inverse(dp, pp, tp, order):
    topo = Topology(dp, pp, tp, order)
    seen = set()
    for rank in range(topo.size):
        coords = topo.coords(rank)
        assert topo.rank(**coords) == rank
        seen.add(tuple(coords.values()))
    assert len(seen) == topo.size


@pytest.mark.parametrize("dp, pp, tp", LAYOUTS)
def test_tp_is_innermost_by_default(dp, pp, tp):
    topo = Topology(dp, pp, tp)
    # Consecutive world ranks share dp and pp and differ in tp: a tp group stays on one node.
    for rank in range(0, topo.size, tp):
        group = topo.axis_group(rank, "tp")
        assert group == list(range(rank, rank + tp))


def test_row_major_matches_mpi_cart_coords():
    topo = Topology(2, 3, 4)
    expected = list(itertools.product(range(2), range(3), range(4)))
    assert [tuple(topo.coords(r).values()) for r in range(24)] == expected


def test_pipeline_neighbours():
    topo = Topology(dp=2, pp=3, tp=2)
    rank = topo.rank(dp=1, pp=1, tp=1)
    prev, nxt = topo.pp_neighbours(rank)
    assert topo.coords(prev) == {"dp": 1, "pp": 0, "tp": 1}
    assert topo.coords(nxt) == {"dp": 1, "pp": 2, "tp": 1}
    assert topo.pp_neighbours(topo.rank(dp=0, pp=0, tp=0))[0] is None
    assert topo.pp_neighbours(topo.rank(dp=0, pp=2, tp=0))[1] is None


def test_axis_groups_partition_the_world():
    topo = Topology(2, 2, 2)
    for axis in ("dp", "pp", "tp"):
        groups = {tuple(topo.axis_group(r, axis)) for r in range(topo.size)}
        assert sorted(r for g in groups for r in g) == list(range(topo.size))


def test_bad_topologies():
    with pytest.raises(ValueError, match="order"):
        Topology(1, 1, 1, ("dp", "pp"))
    with pytest.raises(ValueError, match="pp degree"):
        Topology(1, 0, 1)
    with pytest.raises(ValueError, match="outside"):
        Topology(1, 2, 1).coords(2)


def test_parse_and_describe():
    topo = Topology.parse(1, 2, 2, "pp,tp,dp")
    assert topo.order == ("pp", "tp", "dp")
    assert "world_rank" in topo.describe()
    assert topo.describe(hosts=["a", "b", "c", "d"]).splitlines()[1].endswith("a")
