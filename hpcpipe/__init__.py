"""hpcpipe: pipeline-parallel transformer training over MPI."""

__version__ = "0.1.0"
