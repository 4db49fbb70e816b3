"""The (dp, pp, tp) process grid: pure rank arithmetic plus its MPI Cartesian communicator."""

from __future__ import annotations

from dataclasses import dataclass

AXES = ("dp", "pp", "tp")


@dataclass(frozen=True)
class Topology:
    """Degrees of each axis and their nesting order (the last axis varies fastest)."""

    dp: int = 1
    pp: int = 1
    tp: int = 1
    order: tuple[str, ...] = AXES

    def __post_init__(self) -> None:
        if sorted(self.order) != sorted(AXES):
            raise ValueError(f"order {self.order} must name each of {AXES} once")
        for axis in AXES:
            if self.degree(axis) < 1:
                raise ValueError(f"{axis} degree must be >= 1 (got {self.degree(axis)})")

    @classmethod
    def parse(cls, dp: int, pp: int, tp: int, order: str = "dp,pp,tp") -> Topology:
        """Build from degrees and a comma-separated order such as 'dp,pp,tp'."""
        return cls(dp, pp, tp, tuple(a.strip() for a in order.split(",")))

    def degree(self, axis: str) -> int:
        """Number of ranks along one axis."""
        return getattr(self, axis)

    @property
    def dims(self) -> tuple[int, ...]:
        """Axis sizes in nesting order (what Create_cart receives)."""
        return tuple(self.degree(a) for a in self.order)

    @property
    def size(self) -> int:
        return self.dp * self.pp * self.tp

    def coords(self, rank: int) -> dict[str, int]:
        """World rank -> coordinate per axis (row-major like MPI_Cart_coords)."""
        if not 0 <= rank < self.size:
            raise ValueError(f"rank {rank} outside a grid of {self.size} ranks")
        out = {}
        for axis, dim in zip(reversed(self.order), reversed(self.dims), strict=True):
            rank, out[axis] = divmod(rank, dim)
        return {a: out[a] for a in AXES}

    def rank(self, **coords: int) -> int:
        """Coordinates (dp=, pp=, tp=) -> world rank."""
        rank = 0
        for axis, dim in zip(self.order, self.dims, strict=True):
            coord = coords.get(axis, 0)
            if not 0 <= coord < dim:
                raise ValueError(f"{axis} coordinate {coord} outside 0..{dim - 1}")
            rank = rank * dim + coord
        return rank

    def axis_group(self, rank: int, axis: str) -> list[int]:
        """World ranks that differ from `rank` only along `axis`, ordered by that coordinate."""
        base = self.coords(rank)
        return [self.rank(**{**base, axis: c}) for c in range(self.degree(axis))]

    def pp_neighbours(self, rank: int) -> tuple[int | None, int | None]:
        """World ranks of the previous and next pipeline stage (None at the ends)."""
        group = self.axis_group(rank, "pp")
        pp_rank = self.coords(rank)["pp"]
        prev = group[pp_rank - 1] if pp_rank > 0 else None
        nxt = group[pp_rank + 1] if pp_rank < self.pp - 1 else None
        return prev, nxt

    def describe(self, hosts: list[str] | None = None) -> str:
        """A table of world rank -> (dp, pp, tp) [and host]."""
        lines = [f"world_rank  dp  pp  tp{'  host' if hosts else ''}"]
        for r in range(self.size):
            c = self.coords(r)
            host = f"  {hosts[r]}" if hosts else ""
            lines.append(f"{r:>10}  {c['dp']:>2}  {c['pp']:>2}  {c['tp']:>2}{host}")
        return "\n".join(lines)


class Grid:
    """MPI Cartesian communicator over the topology, with one sub-communicator per axis."""

    def __init__(self, comm, topology: Topology):
        if comm.Get_size() != topology.size:
            raise ValueError(
                f"grid dp={topology.dp} x pp={topology.pp} x tp={topology.tp} = {topology.size} "
                f"ranks, but the communicator has {comm.Get_size()}"
            )
        self.topology = topology
        # NOTE: reorder=False keeps cart ranks equal to world ranks, so Topology's arithmetic
        # (and `hpcpipe topology`) describes exactly what MPI built.
        self.cart = comm.Create_cart(list(topology.dims), [False] * 3, reorder=False)
        self.world_rank = self.cart.Get_rank()
        self.coords = topology.coords(self.world_rank)
        assert tuple(self.cart.Get_coords(self.world_rank)) == tuple(
            self.coords[a] for a in topology.order
        )
        self.comms = {
            axis: self.cart.Sub([a == axis for a in topology.order]) for axis in topology.order
        }
        self.extra_comms: list = []  # made by split_pp, freed with the grid

    @property
    def pp_comm(self):
        return self.comms["pp"]

    @property
    def tp_comm(self):
        return self.comms["tp"]

    @property
    def dp_comm(self):
        return self.comms["dp"]

    @property
    def pp_rank(self) -> int:
        return self.coords["pp"]

    @property
    def tp_rank(self) -> int:
        return self.coords["tp"]

    @property
    def dp_rank(self) -> int:
        return self.coords["dp"]

    def split_pp(self, pp_ranks) -> object | None:
        """Collective over pp_comm: a communicator of these pp ranks (None on the others).

        Used for tied parameters: the ranks holding copies of one matrix reduce its gradient.
        """
        from mpi4py import MPI

        member = self.pp_rank in pp_ranks
        comm = self.pp_comm.Split(0 if member else MPI.UNDEFINED, self.pp_rank)
        if comm == MPI.COMM_NULL:
            return None
        self.extra_comms.append(comm)
        return comm

    @property
    def all_comms(self) -> list:
        """Every communicator this grid holds (for ULFM revocation)."""
        return [self.cart, *self.comms.values(), *self.extra_comms]

    def free(self) -> None:
        """Release the communicators."""
        for comm in [*self.comms.values(), *self.extra_comms]:
            comm.Free()
        self.cart.Free()
