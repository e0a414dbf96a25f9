"""Checkpoints: model and optimizer through torch.distributed.checkpoint (DCP), plus trainer state and RNG.

Layout of one checkpoint folder ``<run>/checkpoints/step_00000100/``::

    .metadata, __0_0.distcp, ...   DCP files: {"model": ..., "optim": ...} (sharded when the model is)
    trainer_state.json             step, tokens, loader state, model config, resolved run config
    rng_rank<R>.pt                 each rank's torch RNG states (loaded with weights_only=True)
    checksums.json                 sha256 of every other file, written last

A checkpoint is written to ``step_XXXXXXXX.tmp`` and renamed when every file is in place, so a folder without
the suffix is always complete; an interrupted save leaves only a ``.tmp`` folder, which resume ignores. The
checksums are verified when a checkpoint is loaded: a flipped byte or a truncated file is an error naming the
file. Each rank hashes its share of the files (at save and at load), so the cost is one read of the checkpoint
spread over the ranks.
DCP state dicts come from ``torch.distributed.checkpoint.state_dict``, so the same code saves a plain model
and an FSDP2-sharded one, and a checkpoint can be loaded with a different number of ranks.
"""

from __future__ import annotations

import errno
import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from llamita.train.parallel import first_failure

STATE_FILE = "trainer_state.json"
CHECKSUMS_FILE = "checksums.json"
PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A missing, incomplete or unreadable checkpoint; the message names the path."""


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_ranks_ok(error: BaseException | None) -> None:
    """Raise on every rank if `error` happened on any (see `parallel.first_failure`).

    The failing rank re-raises its own error; the others raise an OSError naming that rank and its error (with
    errno ENOSPC when the disk was full, so the message says so).
    """
    mine = None if error is None else (f"{type(error).__name__}: {error}"[:1000], _is_disk_full(error))
    failure = first_failure(mine)
    if error is not None:
        raise error
    if failure is not None:
        rank, (message, full) = failure
        raise OSError(errno.ENOSPC if full else errno.EIO, f"rank {rank} failed: {message}")


def _on_every_rank(step: Callable[[], object]) -> None:
    """Run this rank's part of a save step, then agree with the other ranks on whether every part succeeded."""
    error: BaseException | None = None
    try:
        step()
    except (OSError, CheckpointException) as e:
        error = e
    _all_ranks_ok(error)


def _hash_files(folder: Path, names: list[str]) -> dict[str, str]:
    """sha256 of `names` in `folder`, each rank hashing every world-th file; every rank gets the whole dict."""
    from llamita.data.shards import file_sha256

    mine: dict[str, str] = {}
    _on_every_rank(lambda: mine.update({name: file_sha256(folder / name) for name in names[_rank() :: _world()]}))
    if _world() == 1:
        return mine
    parts: list[dict[str, str] | None] = [None] * _world()
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts if part for k, v in part.items()}


def write_checksums(folder: Path) -> None:
    """Record the sha256 of every file of a checkpoint folder in checksums.json; every rank calls this last."""
    folder = Path(folder)
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != CHECKSUMS_FILE)
    sums = _hash_files(folder, names)
    _on_every_rank(lambda: (folder / CHECKSUMS_FILE).write_text(json.dumps(sums, indent=1)) if _rank() == 0 else None)


def verify_checksums(folder: Path) -> None:
    """Compare every file of a checkpoint folder with checksums.json; raise CheckpointError naming a bad file.

    A folder without checksums.json (written before llamita recorded them) is accepted unverified.
    """
    folder = Path(folder)
    manifest = folder / CHECKSUMS_FILE
    if not manifest.is_file():
        return
    try:
        expected = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{manifest}: unreadable checksums ({e}); the checkpoint is damaged") from None
    missing = sorted(name for name in expected if not (folder / name).is_file())
    if missing:
        raise CheckpointError(f"{folder / missing[0]}: missing from the checkpoint (listed in {CHECKSUMS_FILE})")
    try:
        actual = _hash_files(folder, sorted(expected))
    except OSError as e:
        raise CheckpointError(f"{folder}: a checkpoint file could not be read ({e})") from e
    bad = sorted(name for name in expected if actual[name] != expected[name])
    if bad:
        raise CheckpointError(
            f"{folder / bad[0]}: sha256 differs from {CHECKSUMS_FILE} (damaged or truncated file"
            f"{f'; also {bad[1:]}' if len(bad) > 1 else ''}); resume from an earlier checkpoint by deleting "
            f"or moving {folder.name}, or pass another folder to --checkpoint.resume"
        )


def checkpoint_path(run_dir: Path, step: int) -> Path:
    """The folder of the checkpoint taken after optimizer step `step`."""
    return Path(run_dir) / "checkpoints" / f"{PREFIX}{step:08d}"


def is_complete(path: Path) -> bool:
    """True for a finished checkpoint folder (renamed from .tmp, with DCP metadata and trainer state)."""
    return (
        path.is_dir()
        and path.name.startswith(PREFIX)
        and not path.name.endswith(".tmp")
        and (path / ".metadata").is_file()
        and (path / STATE_FILE).is_file()
    )


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if is_complete(p))


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a run directory (its latest complete checkpoint) or one checkpoint folder."""
    path = Path(path)
    if is_complete(path):
        return path
    if not path.exists():
        raise CheckpointError(f"{path}: no such run directory or checkpoint folder")
    found = list_checkpoints(path)
    if found:
        return found[-1]
    if path.name.endswith(".tmp"):
        raise CheckpointError(f"{path}: an interrupted save (.tmp); use a complete checkpoint folder instead")
    raise CheckpointError(
        f"{path}: not a checkpoint folder (expected .metadata and {STATE_FILE}) and no complete checkpoint "
        f"under {path / 'checkpoints'}; pass a run directory or a step_XXXXXXXX folder"
    )


def read_state(path: Path) -> dict[str, Any]:
    """The trainer_state.json of a checkpoint folder."""
    try:
        return json.loads((Path(path) / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{Path(path) / STATE_FILE}: unreadable trainer state ({e})") from None


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any]
) -> Path:
    """Save model, optimizer, trainer state and RNG to `path` atomically; every rank calls this."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    try:
        with warnings.catch_warnings():
            # DCP warns that it runs without a process group on a single process; that is intended.
            warnings.simplefilter("ignore", UserWarning)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)  # raises on every rank if any fails
        # Each step below ends with the ranks agreeing that it worked everywhere, so a failure on one rank raises on
        # all of them instead of leaving the others at the next barrier.
        _on_every_rank(lambda: _write_rank_files(tmp, trainer_state))
        write_checksums(tmp)  # last: a folder with checksums.json holds every file it lists
        _on_every_rank(lambda: _publish(tmp, path) if _rank() == 0 else None)
    except (OSError, CheckpointException) as e:
        shutil.rmtree(tmp, ignore_errors=True)  # give the space back; earlier checkpoints are untouched
        full = _is_disk_full(e)
        raise CheckpointError(
            f"{tmp}: saving the checkpoint failed ({'no space left on device' if full else e}); the previous "
            f"checkpoints in {path.parent} are intact. {'Free disk space' if full else 'Fix the cause'}, then "
            "run the same command again to resume from the latest one"
        ) from e
    return path


def _write_rank_files(tmp: Path, trainer_state: dict[str, Any]) -> None:
    """This rank's RNG state; rank 0 also writes the trainer state."""
    torch.save(_rng_state(), tmp / f"rng_rank{_rank()}.pt")
    if _rank() == 0:
        (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=1))


def _publish(tmp: Path, path: Path) -> None:
    """Rank 0: move the finished folder to its final name, replacing a folder of the same step."""
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


def _is_disk_full(error: BaseException) -> bool:
    """True when `error` or an error it wraps (DCP collects each rank's failure) is ENOSPC."""
    seen: list[BaseException] = [error]
    while seen:
        e = seen.pop()
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if isinstance(e, CheckpointException):
            seen += [failure[0] for failure in e.failures.values()]  # (exception, traceback) per rank
        if e.__cause__ is not None:
            seen.append(e.__cause__)
    return False


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Load a checkpoint into `model` (and `optimizer`, and this rank's RNG); return the trainer state."""
    path = resolve_checkpoint(path)
    verify_checksums(path)
    state = read_state(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        try:
            if optimizer is None:
                model_sd = get_model_state_dict(model)
                dcp.load({"model": model_sd}, checkpoint_id=path)
                set_model_state_dict(model, model_sd)
            else:
                model_sd, optim_sd = get_state_dict(model, optimizer)
                sd = {"model": model_sd, "optim": optim_sd}
                dcp.load(sd, checkpoint_id=path)
                set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: cannot load checkpoint: {e}") from e
    if optimizer is not None:
        rng_file = path / f"rng_rank{_rank()}.pt"
        if rng_file.is_file():
            rng = torch.load(rng_file, weights_only=True)
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
    return state


def prune_checkpoints(run_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the `keep_last` newest complete checkpoints (0 keeps all); return what was deleted.

    Called only after a new checkpoint is complete. A failed delete is reported, not raised: losing disk space
    must not stop a training run.
    """
    if keep_last <= 0 or _rank() != 0:
        return []
    old = list_checkpoints(run_dir)[:-keep_last]
    deleted = []
    for p in old:
        try:
            shutil.rmtree(p)
            deleted.append(p)
        except OSError as e:
            warnings.warn(f"could not delete old checkpoint {p}: {e}", stacklevel=2)
    return deleted
