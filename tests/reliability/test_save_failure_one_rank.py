"""A checkpoint save that fails on one of 2 ranks raises a CheckpointError on both, promptly, instead of leaving the
healthy rank waiting at the next collective until the process group times out; the previous checkpoint stays."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

DRIVER = textwrap.dedent(
    """
    import errno, json, sys
    from datetime import timedelta
    from pathlib import Path
    import torch, torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from llamita.model import Llama, get_preset
    from llamita.train import checkpoint as ckpt
    from llamita.train.parallel import apply_fsdp, end_distributed

    fault, where, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = Llama(get_preset("debug"))
    apply_fsdp(model, init_device_mesh("cpu", (2,)), param_dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    run = out / "run" / "checkpoints"
    ckpt.save_checkpoint(run / "step_00000001", model, optimizer, {"step": 1})

    def fail(*args, **kwargs):
        if fault == "disk-full":
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        raise PermissionError(errno.EACCES, f"permission denied (injected {fault})")

    import llamita.data.shards as shards
    originals = (ckpt._write_rank_files, ckpt._publish, shards.file_sha256)
    if rank == where:
        if fault in ("disk-full", "rank-files"):
            ckpt._write_rank_files = fail
        elif fault == "hash":
            shards.file_sha256 = fail
        elif fault == "publish":
            ckpt._publish = fail
    try:
        ckpt.save_checkpoint(run / "step_00000002", model, optimizer, {"step": 2})
        result = {"raised": None}
    except ckpt.CheckpointError as e:
        result = {"raised": type(e).__name__, "message": str(e)}
    ckpt._write_rank_files, ckpt._publish, shards.file_sha256 = originals
    dist.barrier()
    result["checkpoints"] = [p.name for p in sorted(run.iterdir())]
    ckpt.verify_checksums(run / "step_00000001")
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    end_distributed()  # no rank tears the group down while a peer still uses it
    """
)


@pytest.mark.parametrize(
    "fault,where",
    [("rank-files", 1), ("disk-full", 1), ("rank-files", 0), ("hash", 1), ("publish", 0)],
    ids=["rng-write-rank1", "disk-full-rank1", "state-write-rank0", "checksum-rank1", "rename-rank0"],
)
def test_save_failing_on_one_rank_raises_on_both(tmp_path, fault, where):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)]
    command += [fault, str(where), str(tmp_path)]
    proc = subprocess.run(
        command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, f"{' '.join(command)} failed:\n{proc.stderr[-6000:]}"
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, result in enumerate(results):
        assert result["raised"] == "CheckpointError", (rank, result)
        assert "step_00000002.tmp" in result["message"] and "intact" in result["message"]
        assert result["checkpoints"] == ["step_00000001"]  # no .tmp left, no half-published step 2
        if fault == "disk-full":
            assert "no space left on device" in result["message"]
        elif rank != where:
            assert f"rank {where} failed: PermissionError" in result["message"]
        else:
            assert f"injected {fault}" in result["message"]
