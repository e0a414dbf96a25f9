"""`llamita dpo` end to end on CPU: the pretraining trainer with tree-packed preference pairs, reference log-probs
computed once and stored (reused on resume, recomputed when the data or the reference changes), the same losses as
a live reference and with activation checkpointing, exact resume, preference metrics in metrics.jsonl, bad records
counted; and on 2 gloo processes (FSDP2), the one process's stored reference log-probs and losses."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import textwrap

import numpy as np
import pytest
import torch

from llamita.chat.reference_logps import META_FILE, REFERENCE_FILE
from llamita.cli import main
from llamita.config import load_config
from llamita.train import checkpoint as ckpt
from llamita.train.metrics import read_metrics
from pretrain_runs import finish, torchrun


@pytest.fixture(scope="module")
def base_run(debug_config, tmp_path_factory):
    """A short pretraining run of the debug preset to preference-tune."""
    from llamita.pretrain import pretrain

    cfg = debug_config(tmp_path_factory.mktemp("dpo_base") / "run", **{"train.max_steps": "6", "eval.interval": "0"})
    pretrain(cfg)
    return cfg.out_dir


def _write_pairs(path, n: int = 60, offset: int = 1) -> None:
    """Arithmetic pairs (chosen: the right sum; rejected: off by one), in both schemas, and two bad records."""
    with path.open("w") as f:
        for i in range(n):
            question, right, wrong = (
                f"what is {i} plus one?",
                f"{i} plus one is {i + offset}.",
                f"{i} plus one is {i + 2}.",
            )
            if i % 2:
                f.write(json.dumps({"prompt": question, "chosen": right, "rejected": wrong}) + "\n")
            else:
                user = {"role": "user", "content": question}
                record = {"chosen": [user, {"role": "assistant", "content": right}],
                          "rejected": [user, {"role": "assistant", "content": wrong}]}  # fmt: skip
                f.write(json.dumps(record) + "\n")
        f.write("{not json\n")
        f.write(json.dumps({"prompt": "x", "chosen": "same", "rejected": "same"}) + "\n")


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prefs") / "prefs.jsonl"
    _write_pairs(path)
    return path


def _cfg(out, base_run, pairs_file, **overrides):
    values = {"out_dir": str(out), "init.from": str(base_run), "dpo.data": f"['{pairs_file}']", **overrides}
    return load_config("dpo-debug", values)


def _losses(run) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


@pytest.fixture(scope="module")
def dpo_run(base_run, pairs_file, tmp_path_factory):
    """A whole dpo-debug run (two epochs, every checkpoint kept) with stored reference log-probs, and its output."""
    from llamita.dpo import dpo

    out = tmp_path_factory.mktemp("dpo") / "run"
    capture = pytest.MonkeyPatch()
    printed: list[str] = []
    capture.setattr("builtins.print", lambda *a, **k: printed.append(" ".join(map(str, a))))
    try:
        result = dpo(_cfg(out, base_run, pairs_file, **{"checkpoint.keep_last": "0"}))
    finally:
        capture.undo()
    return out, result, "\n".join(printed)


def test_dpo_trains_on_stored_reference_log_probs_and_logs_preference_metrics(dpo_run):
    out, result, printed = dpo_run
    assert "2 record(s) rejected" in printed and "invalid_json=1" in printed and "same_completion=1" in printed
    assert "reference log-probs: computing them for 60 pairs (none stored" in printed
    assert (out / REFERENCE_FILE).is_file() and json.loads((out / META_FILE).read_text())["pairs"] == 60
    rows = read_metrics(out / "metrics.jsonl")
    train = [r for r in rows if "loss" in r]
    # Step 1 starts from the reference itself: every log-ratio is 0, the sigmoid loss log 2 and the rewards 0.
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert train[0]["rewards/margins"] == pytest.approx(0, abs=1e-6)
    assert train[-1]["loss"] < train[0]["loss"] and train[-1]["rewards/margins"] > 0
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert all(key in r for r in train)
    val = [r for r in rows if "val_loss" in r]
    assert val[0]["step"] == 0 and val[0]["val_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert {"val_rewards/accuracies", "val_rewards/margins", "val_pairs"} <= set(val[-1])
    assert result["step"] == train[-1]["step"] > 4 and result["val_pairs"] == val[-1]["val_pairs"] > 0


def test_a_live_reference_gives_the_stored_references_losses(dpo_run, base_run, pairs_file, tmp_path, capsys):
    from llamita.dpo import dpo

    out, _, _ = dpo_run
    dpo(_cfg(tmp_path / "live", base_run, pairs_file, **{"dpo.reference": "live"}))
    assert "a frozen copy of the starting model" in capsys.readouterr().out
    assert not (tmp_path / "live" / REFERENCE_FILE).exists()
    assert _losses(tmp_path / "live") == pytest.approx(_losses(out), rel=1e-6)


def test_activation_checkpointing_trains_with_the_same_losses(dpo_run, base_run, pairs_file, tmp_path):
    """Recomputing the blocks in backward (the reference pass runs through the same wrapped blocks, without
    gradients) changes no loss."""
    from llamita.dpo import dpo

    out, _, _ = dpo_run
    dpo(_cfg(tmp_path / "ac", base_run, pairs_file, **{"parallel.activation_checkpoint": "selective"}))
    assert _losses(tmp_path / "ac") == pytest.approx(_losses(out), abs=1e-6)


@pytest.mark.parametrize("recompute, micro_batch", [("full", "2"), ("selective", "1")])
def test_bf16_weights_and_8bit_moments_train(dpo_run, base_run, pairs_file, tmp_path, recompute, micro_batch):
    """The low-memory mode (bf16 weights, stochastic rounding, torchao's AdamW8bit) with full activation
    checkpointing, and as the benchmark's fastest within TRL's memory (selective, smaller micro-batches: 4 a step
    here): the reference log-probs are the bf16 model's, so step 1's loss is log 2; the loss falls, the chosen
    answers gain on the rejected ones, and every step's loss is the fp32 run's to within 5e-3."""
    pytest.importorskip("torchao")
    from llamita.dpo import dpo

    out = tmp_path / "lowmem"
    low = {"train.weights": "bf16", "optim.name": "adamw8bit", "parallel.activation_checkpoint": recompute,
           "train.micro_batch": micro_batch}  # fmt: skip
    dpo(_cfg(out, base_run, pairs_file, **low))
    train = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert train[-1]["loss"] < train[0]["loss"] and train[-1]["rewards/margins"] > 0
    # Within the rounding of bf16 weights and 8-bit moments of the fp32 run, step by step (they differ by < 1e-3).
    assert _losses(out) == pytest.approx(_losses(dpo_run[0]), abs=5e-3)


def test_resume_is_exact_and_reuses_the_stored_reference_log_probs(dpo_run, base_run, pairs_file, tmp_path, capsys):
    from llamita.dpo import dpo

    out, _, _ = dpo_run
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    stored = (resumed / REFERENCE_FILE).read_bytes()
    for folder in ckpt.list_checkpoints(resumed):
        if folder.name != "step_00000004":
            shutil.rmtree(folder)
    dpo(_cfg(resumed, base_run, pairs_file))
    printed = capsys.readouterr().out
    assert "reference log-probs: reused" in printed and "checksum verified" in printed
    assert "resumed from" in printed
    assert _losses(resumed) == _losses(out)
    assert (resumed / REFERENCE_FILE).read_bytes() == stored


def test_changed_data_or_reference_weights_or_a_damaged_file_recompute_them(dpo_run, base_run, tmp_path, capsys):
    from llamita.dpo import dpo

    out, _, _ = dpo_run
    one_step = {"train.max_steps": "1", "eval.interval": "0", "checkpoint.resume": "none"}
    run = tmp_path / "run"
    run.mkdir()
    for name in (REFERENCE_FILE, META_FILE):
        shutil.copy(out / name, run / name)
    same, changed = tmp_path / "same.jsonl", tmp_path / "changed.jsonl"
    _write_pairs(same)
    _write_pairs(changed, offset=3)  # other chosen answers
    dpo(_cfg(run, base_run, same, **one_step))
    assert "reference log-probs: reused" in capsys.readouterr().out  # the same pairs from another file
    dpo(_cfg(run, base_run, changed, **one_step))
    assert "(the data changed since they were stored)" in capsys.readouterr().out
    dpo(_cfg(run, out, changed, **one_step))  # starting from the tuned model: another reference
    assert "(the reference weights changed since they were stored)" in capsys.readouterr().out
    damaged = bytearray((run / REFERENCE_FILE).read_bytes())
    damaged[-1] ^= 0xFF
    (run / REFERENCE_FILE).write_bytes(bytes(damaged))
    dpo(_cfg(run, out, changed, **one_step))
    assert "does not match its checksum" in capsys.readouterr().out


def test_lora_with_a_live_reference_and_the_reference_free_simpo(base_run, pairs_file, tmp_path, capsys):
    from llamita.dpo import dpo

    short = {"train.max_steps": "2", "eval.interval": "0"}
    lora = dpo(_cfg(tmp_path / "lora", base_run, pairs_file, **short, **{"lora.rank": "4", "dpo.reference": "live"}))
    assert _losses(tmp_path / "lora")[1] == pytest.approx(math.log(2), abs=1e-6) and lora["step"] == 2
    dpo(_cfg(tmp_path / "simpo", base_run, pairs_file, **short, **{"dpo.loss": "simpo", "dpo.beta": "2.0"}))
    assert "reference: none (simpo is reference-free)" in capsys.readouterr().out
    assert not (tmp_path / "simpo" / REFERENCE_FILE).exists()
    assert all(math.isfinite(v) for v in _losses(tmp_path / "simpo").values())


def test_dpo_errors_are_one_line(base_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["dpo", "--config", "dpo-debug", "--out_dir", str(tmp_path / "x"), "--init.from", str(base_run)])
    assert e.value.code == 2 and "dpo.data is empty" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["dpo", "--config", "dpo-debug", "--dpo.data", "[x.jsonl]", "--init.from", str(base_run),
              "--dpo.max_prompt_length", "64"])  # fmt: skip
    assert e.value.code == 2 and "dpo.max_prompt_length=64 must be below dpo.max_length=64" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- 2 gloo processes on CPU
DRIVER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch, torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    import llamita.chat.reference_logps as reference_logps
    from llamita.chat.packing import TreeRows
    from llamita.config import load_config
    from llamita.dpo import dpo
    from llamita.model import Llama, ModelConfig
    from llamita.train.parallel import apply_fsdp, end_distributed

    recipe = Path(sys.argv[1])
    here = recipe.parent  # the test's folder: split.pt in, split.<rank>.json out
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    # The reference pass over hand-sized parts, on an FSDP2-sharded model; every forward pass's pairs recorded.
    given = torch.load(here / "split.pt", weights_only=True)  # tensors, numbers and the config's fields only
    model = Llama(ModelConfig(**given["config"]))
    model.load_state_dict(given["weights"])
    apply_fsdp(model, init_device_mesh("cpu", (2,)), param_dtype=torch.float32)
    parts = [TreeRows(*(a.numpy() for a in part)) for part in given["parts"]]
    passes = []
    score = reference_logps.pair_logps
    def recording(model, batch):
        passes.append(batch.pair_ids.tolist())
        return score(model, batch)
    reference_logps.pair_logps = recording
    table = reference_logps.compute_reference_logps(
        model, parts, given["n_pairs"], batch_size=given["batch_size"], device=torch.device("cpu")
    )
    reference_logps.pair_logps = score
    (here / f"split.{rank}.json").write_text(json.dumps({"table": table.tolist(), "passes": passes}))
    # A whole `llamita dpo` run of the recipe.
    dpo(load_config(str(recipe)))
    end_distributed()  # no rank tears the group down while a peer still uses it
    """
)


def test_two_ranks_store_one_ranks_reference_log_probs_and_train_with_its_losses(
    dpo_run, base_run, pairs_file, tmp_path
):
    """FSDP2 over 2 gloo ranks, the same global batch: the reference pass scores every pair on exactly one rank (rows
    split r, r + 2, ...; a rank short of rows repeats one of its own, a part of one row is scored by both) and gives
    one process's log-probs, stored as one process stores them; the run's per-step losses and its held-out metrics
    (7 pairs, every one scored once) are one process's."""
    from llamita.chat.packing import Pair, pack_pairs
    from llamita.chat.reference_logps import compute_reference_logps
    from llamita.model import Llama, get_preset

    config = get_preset("debug")
    rng = np.random.default_rng(0)

    def tokens(low: int, high: int) -> tuple[int, ...]:
        return tuple(rng.integers(3, config.vocab_size, rng.integers(low, high)).tolist())

    # Parts of 7 rows (odd), 5 (rank 1 a batch short at batch size 2) and 1 (fewer rows than ranks), a pair each.
    sizes, parts, first = (7, 5, 1), [], 0
    for n in sizes:
        pairs = [Pair(tokens(2, 20), tokens(1, 14), tokens(1, 14), first + i) for i in range(n)]
        parts.append(pack_pairs(pairs, 48, pad_id=0, packing=False)[0])
        first += n
    torch.manual_seed(0)
    model = Llama(config)
    arrays = [[torch.from_numpy(a) for a in (r.inputs, r.targets, r.positions, r.branches, r.pairs)] for r in parts]
    torch.save({"config": dataclasses.asdict(config), "weights": model.state_dict(), "parts": arrays,
                "n_pairs": first, "batch_size": 2}, tmp_path / "split.pt")  # fmt: skip
    fewer = {"eval.interval": "0", "checkpoint.interval": "0", "train.threads": "1"}  # the same losses, sooner
    # 3 held-out rows, one a batch (all of them): rank 1 runs a padding batch (no pair) beside rank 0's second.
    fewer |= {"eval.batch_size": "1", "eval.batches": "100"}
    cfg = _cfg(tmp_path / "two", base_run, pairs_file, **fewer)
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    finish(torchrun(cfg, script=script))

    expected = compute_reference_logps(model, parts, first, batch_size=2, device=torch.device("cpu"))  # [P, 2]
    results = [json.loads((tmp_path / f"split.{rank}.json").read_text()) for rank in (0, 1)]
    scored = []
    for result in results:
        torch.testing.assert_close(torch.tensor(result["table"]), expected, rtol=1e-6, atol=1e-5)
        assert len(result["passes"]) == 2 + 2 + 1  # per part ceil(ceil(rows / 2) / 2): the same on both ranks
        scored.append({p for ids in result["passes"] for p in ids})
    last = set(range(first - sizes[-1], first))
    assert scored[0] | scored[1] == set(range(first)) and scored[0] & scored[1] == last
    assert [len(ids) for ids in results[1]["passes"]] == [2, 1, 2, 2, 1]  # rows 1, 3 | 5 ; 1, 3 | 1, 3 (again) ; 0
    assert results[1]["passes"][3] == results[1]["passes"][2]

    out, _, _ = dpo_run
    two = tmp_path / "two"
    one_meta, two_meta = (json.loads((run / META_FILE).read_text()) for run in (out, two))
    assert two_meta["pairs"] == one_meta["pairs"] and two_meta["data"] == one_meta["data"]
    np.testing.assert_allclose(np.load(two / REFERENCE_FILE), np.load(out / REFERENCE_FILE), rtol=1e-6, atol=1e-5)
    assert _losses(two) == pytest.approx(_losses(out), abs=1e-5)
    # The held-out pairs at the last step: every one scored once on 2 ranks too, so the same means.
    one_val, two_val = ([r for r in read_metrics(run / "metrics.jsonl") if "val_loss" in r][-1] for run in (out, two))
    assert one_val["val_pairs"] == two_val["val_pairs"] == 7
    assert {k: v for k, v in two_val.items() if k != "time"} == pytest.approx(
        {k: v for k, v in one_val.items() if k != "time"}, rel=1e-6, abs=1e-5
    )  # rel: summed log-probs of ~100 tokens (-111) differ by fp32 rounding of another reduction order
