"""hpcpipe: pipeline-parallel transformer training over MPI."""

import os

__version__ = "0.1.0"

# NOTE: Open MPI's default non-blocking Allreduce (libnbc) runs at a third of the blocking one's
# bandwidth for gradient buckets; its ring algorithm matches or beats it when polled (measured,
# benchmarks/README.md). Set before mpi4py initialises MPI; a user's own setting wins.
os.environ.setdefault("OMPI_MCA_coll_libnbc_iallreduce_algorithm", "ring")
