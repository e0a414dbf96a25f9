"""The reference model's log-probs of every preference pair, computed once before training and stored with the run.

DPO compares the policy with the model it started from. Instead of keeping that second model in memory and running
it on every batch (TRL's default), its summed log-probs of each pair's two answers are computed in one pass before
the first step, with the model that is about to be trained (the weights of `init.from`, before any resume loads a
checkpoint), and stored in the run directory:

- ``reference_logps.npy``: [P, 2] float32, the (chosen, rejected) log-probs of pair id 0 .. P - 1;
- ``reference_logps.json``: the file's sha256, the number of pairs, and two fingerprints: of the data (the packed
  trees of the training and held-out pairs: tokens, layout, pair ids) and of the reference (its weights' sums and
  the compute precision).

Every start of the run, fresh or resumed, reuses the file -- read memory-mapped, its checksum verified -- when the
fingerprints match, and recomputes it otherwise (other data, template, tokenizer or lengths; other `init.from`
weights; another precision), saying why. So a resume continues with exactly the reference log-probs it trained
with, and only one model is in memory while training.

Shapes: P pairs of the run, n pairs of a batch.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from llamita.chat.packing import TreeBatch, TreeRows
from llamita.chat.preference_objective import pair_logps

REFERENCE_FILE = "reference_logps.npy"
META_FILE = "reference_logps.json"


def data_fingerprint(rows: Sequence[TreeRows]) -> str:
    """sha256 over the fingerprints of the packed trees (training rows, then held-out rows)."""
    return hashlib.sha256("".join(r.fingerprint() for r in rows).encode()).hexdigest()


@torch.no_grad()
def weights_fingerprint(model: nn.Module, precision: str) -> str:
    """sha256 of every parameter's shape, sum and sum of squares (float64, over all ranks' shards) and `precision`.

    Cheap (one pass over the weights on their device) and different for other weights; a change of the number of
    ranks may change the sums' last digits and so cause one recomputation.
    """
    parts = []
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p  # an FSDP2 shard is a DTensor
        parts.append(torch.stack([local.double().sum(), local.double().square().sum()]))
    sums = torch.stack(parts)  # [params, 2]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
    shapes = [tuple(p.shape) for p in model.parameters()]
    text = json.dumps([precision, shapes, [[f"{x:.12e}" for x in row] for row in sums.tolist()]])
    return hashlib.sha256(text.encode()).hexdigest()


@torch.no_grad()
def compute_reference_logps(
    model: nn.Module,
    rows: Sequence[TreeRows],
    n_pairs: int,
    *,
    batch_size: int,
    device: torch.device,
    autocast: contextlib.AbstractContextManager | None = None,
) -> Tensor:
    """Every pair's (chosen, rejected) log-probs under `model`, in one pass over `rows`.

    Rank r scores rows r, r + world, ...; every rank runs the same number of forward passes (a rank with fewer rows
    repeats a batch), as FSDP2's gathers need, and the ranks' tables are merged.

    Returns:
        [n_pairs, 2] fp32 on `device`.

    Raises:
        RuntimeError: a pair id below `n_pairs` is in no row.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    was_training = model.training
    model.eval()
    table = torch.full((n_pairs, 2), -torch.inf, dtype=torch.float32, device=device)  # [P, 2]
    for part in rows:
        if not len(part):
            continue
        mine = np.arange(rank, len(part), world)
        if not len(mine):  # fewer rows than ranks
            mine = np.zeros(1, dtype=np.int64)
        for b in range(math.ceil(math.ceil(len(part) / world) / batch_size)):
            index = mine[b * batch_size : (b + 1) * batch_size]
            if not len(index):  # this rank has a batch fewer than another: it repeats its first one
                index = mine[:batch_size]
            batch = TreeBatch(*(t.to(device) for t in part.batch(index)))
            with autocast or contextlib.nullcontext():
                table[batch.pair_ids] = pair_logps(model, batch).float()  # [n, 2]
    model.train(was_training)
    if world > 1:
        dist.all_reduce(table, op=dist.ReduceOp.MAX)  # log-probs are <= 0; a pair not scored on a rank is -inf
    if bool(torch.isinf(table).any()):
        raise RuntimeError("reference log-probs: some pair ids are in no row; pass every row that holds a pair")
    return table


def reference_logps(
    out_dir: Path,
    model: nn.Module,
    rows: Sequence[TreeRows],
    *,
    batch_size: int,
    device: torch.device,
    autocast: contextlib.AbstractContextManager | None,
    precision: str,
    log: Callable[[str], None] = print,
) -> Tensor:
    """The reference log-probs of every pair of `rows`: reused from `out_dir` when still valid, else computed with
    `model` and stored (rank 0 writes).

    Args:
        out_dir: the run directory.
        model: the reference, i.e. the model about to be trained, before it changes (or a checkpoint loads).
        rows: the packed training rows and the held-out rows; their pair ids are 0 .. P - 1.
        batch_size: rows per forward pass.
        device: where the model is.
        autocast: the forward passes' autocast context, if any.
        precision: the compute precision (part of the reference's fingerprint).
        log: where to say what was done (rank 0 prints).

    Returns:
        [P, 2] fp32 on `device`.
    """
    n_pairs = 1 + max((int(r.pairs.max()) for r in rows if len(r)), default=-1)
    key = {"pairs": n_pairs, "data": data_fingerprint(rows), "reference": weights_fingerprint(model, precision)}
    why = stale(out_dir, key)
    if dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([why is None], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)  # every rank takes the same branch
        why = why or (None if flag.item() else "another rank cannot read the stored file")
    path = out_dir / REFERENCE_FILE
    if why is None:
        table = np.load(path, mmap_mode="r")
        log(f"reference log-probs: reused {path} ({n_pairs:,} pairs, checksum verified)")
        return torch.from_numpy(np.array(table, dtype=np.float32)).to(device)  # a copy: the map stays read-only
    log(f"reference log-probs: computing them for {n_pairs:,} pairs ({why})")
    table = compute_reference_logps(model, rows, n_pairs, batch_size=batch_size, device=device, autocast=autocast)
    if not dist.is_initialized() or dist.get_rank() == 0:
        write(out_dir, table.cpu().numpy(), key)
        log(f"reference log-probs: stored in {path}")
    return table


def stale(out_dir: Path, key: dict) -> str | None:
    """Why the stored reference log-probs cannot be used for `key` (a sentence), or None when they can."""
    path, meta_path = out_dir / REFERENCE_FILE, out_dir / META_FILE
    if not path.is_file() or not meta_path.is_file():
        return f"none stored in {out_dir}"
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError:
        return f"{meta_path} is not JSON"
    for field, what in (("pairs", "number of pairs"), ("data", "data"), ("reference", "reference weights")):
        if meta.get(field) != key[field]:
            return f"the {what} changed since they were stored"
    if _sha256(path) != meta.get("sha256"):
        return f"{path} does not match its checksum"
    return None


def write(out_dir: Path, table: np.ndarray, key: dict) -> None:
    """Store `table` ([P, 2] float32) and its metadata, each file appearing only once complete."""
    path = out_dir / REFERENCE_FILE
    partial = path.with_name(path.name + ".partial")
    with partial.open("wb") as f:
        np.save(f, table.astype(np.float32))
    os.replace(partial, path)
    meta = {**key, "sha256": _sha256(path)}
    meta_partial = out_dir / (META_FILE + ".partial")
    meta_partial.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(meta_partial, out_dir / META_FILE)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
