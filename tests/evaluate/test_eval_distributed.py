"""evaluate_tasks on an FSDP2-sharded model (2 gloo processes under torchrun) equals the plain model's results."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from llamita.evaluate.harness import evaluate_tasks

SCRIPT = """
import json, sys
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from llamita.evaluate.harness import evaluate_tasks
from llamita.evaluate.load_model import load_model
from llamita.train.parallel import apply_fsdp, end_distributed

hf_dir, tasks, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo")
torch.set_num_threads(1)
loaded = load_model(hf_dir)
apply_fsdp(loaded.model, init_device_mesh("cpu", (2,)), param_dtype=torch.float32)
result = evaluate_tasks(loaded.model, loaded.tokenizer, tasks, num_fewshot=2, log_samples=True)
result["still_sharded"] = isinstance(loaded.model.lm_head.weight, DTensor)
with open(f"{out}.{dist.get_rank()}", "w") as f:
    json.dump(result, f)
end_distributed()  # no rank tears the group down while a peer still uses it
"""


def test_sharded_model_gives_the_plain_models_results(eval_model, eval_data, tmp_path):
    tasks = {name: str(eval_data["native"][name]) for name in ("hellaswag", "winogrande", "mmlu")}
    script = tmp_path / "fsdp_eval.py"
    script.write_text(SCRIPT)
    out = tmp_path / "result"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)]
    command += [str(eval_model["hf_dir"]), json.dumps(tasks), str(out)]
    proc = subprocess.run(
        command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"{' '.join(command)} failed:\n{proc.stderr[-6000:]}"

    expected = evaluate_tasks(eval_model["model"], eval_model["tokenizer"], tasks, num_fewshot=2, log_samples=True)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"result.{rank}").read_text())
        assert got["still_sharded"]
        assert got["results"] == json.loads(json.dumps(expected["results"]))
        for task, samples in expected["samples"].items():
            for ours, ref in zip(got["samples"][task], samples):
                assert max(abs(a - b) for a, b in zip(ours["loglikelihoods"], ref["loglikelihoods"])) < 1e-5
