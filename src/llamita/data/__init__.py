"""Data pipeline: raw documents -> token shards (sources, shards, prepare) -> training batches (mixture, loader)."""
