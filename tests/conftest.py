"""Shared pytest configuration."""


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slurm: submits a real SLURM job on a one-node cluster started on localhost"
    )
