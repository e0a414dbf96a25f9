"""End-to-end resume inside a mixture ramp and exactly at the boundary between two mixture stages.

The loader-level resumes at awkward points (mid-epoch, epoch end, after a source wrapped, stage boundary, on 1 or
2 ranks) are in `tests/data/test_loader.py::test_resume_at_awkward_points_continues_the_global_order`.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from llamita.data.mixture import Mixture
from llamita.pretrain import pretrain
from llamita.pretrained import load_pretrained
from llamita.train import checkpoint as ckpt
from pretrain_runs import train_rows

STEPS = 10
RAMP = 6  # stage 0 ramps code from weight 0 to 0.8 over steps 0-5; stage 1 (0.5 / 0.5) starts at step 6
STAGES = (
    f"[{{steps: {RAMP}, weights: {{prose: 1, code: 0}}, end_weights: {{prose: 0.2, code: 0.8}}}}, "
    "{weights: {prose: 0.5, code: 0.5}}]"
)
SETTINGS = {
    "train.max_steps": str(STEPS),
    "train.threads": "1",
    "eval.interval": "0",
    "checkpoint.interval": "3",
    "checkpoint.keep_last": "0",
    "data.stages": STAGES,
}


@pytest.fixture(scope="module")
def straight(debug_config, tmp_path_factory):
    """The uninterrupted run, with checkpoints at steps 3, 6, 9 and 10."""
    run = tmp_path_factory.mktemp("resume_points") / "straight"
    pretrain(debug_config(run, **SETTINGS))
    return run


@pytest.mark.parametrize("cut", [3, RAMP], ids=["mid-ramp", "stage-boundary"])
def test_resume_in_a_ramp_or_at_a_stage_boundary_equals_uninterrupted_run(straight, debug_config, tmp_path, cut):
    mixture = Mixture.from_config(debug_config(tmp_path, **SETTINGS).data.stages)
    assert mixture.weights(cut) != mixture.weights(cut - 1)  # the weights change across the cut
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    for folder in ckpt.list_checkpoints(run):
        if ckpt.read_state(folder)["step"] > cut:
            shutil.rmtree(folder)
    state = ckpt.read_state(ckpt.resolve_checkpoint(run))
    assert state["step"] == cut and state["loader"]["sample"] == cut * 8  # 8 sequences per step

    assert pretrain(debug_config(run, **SETTINGS))["step"] == STEPS
    assert [r[0] for r in train_rows(run)] == list(range(1, STEPS + 1))
    assert train_rows(run) == train_rows(straight)
    resumed, expected = load_pretrained(run).model.state_dict(), load_pretrained(straight).model.state_dict()
    assert resumed.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(resumed[name], tensor), name
