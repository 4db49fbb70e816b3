"""hpcpipe: pipeline-parallel transformer training over MPI."""

import os

__version__ = "0.1.0"

# NOTE: Open MPI's default non-blocking Allreduce (libnbc) runs at a third of the blocking one's
# bandwidth for gradient buckets; its ring algorithm matches or beats it when polled (measured,
# benchmarks/README.md). Set before mpi4py initialises MPI; a user's own setting wins.
os.environ.setdefault("OMPI_MCA_coll_libnbc_iallreduce_algorithm", "ring")

# NOTE: torch's CPU allocator backs buffers of 2 MiB and more with transparent huge pages only
# when asked; numpy always asks. Without them MPI moved 16 MiB activations at 0.6x the rate of
# the same bytes in numpy arrays (TLB misses in the copy). Read at torch's first large
# allocation, so it must be set before that; THP_MEM_ALLOC_ENABLE=0 opts out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
