"""Checkpoints: HDF5 shard format, manifest, store (commit, prune, load), Hugging Face files."""
