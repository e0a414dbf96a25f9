"""Data pipeline: raw documents -> token shards (sources, shards, prepare) -> batches (mixture, loader)."""
