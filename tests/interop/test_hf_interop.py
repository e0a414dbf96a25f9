"""Hugging Face export and import, checked against transformers: bytes, configs, logits, greedy generations."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from llamita.cli import main
from llamita.config import RunConfig, save_config
from llamita.inference import LLM, SamplingParams
from llamita.interop import HFFormatError, export_hf, import_hf, load_hf_state_dict
from llamita.pretrained import load_pretrained
from llamita.train import checkpoint as ckpt

transformers = pytest.importorskip("transformers")


def edit_config(model_dir: Path, to: Path, **changes) -> Path:
    """A copy of a model directory whose config.json has `changes` applied (None deletes a key)."""
    shutil.copytree(model_dir, to)
    config = json.loads((to / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (to / "config.json").write_text(json.dumps(config))
    return to


def safetensors_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) safetensors directory."""
    out = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


def hf_model(model_dir: Path) -> transformers.PreTrainedModel:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    return model.eval()


def tokens(vocab_size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 17), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_import_then_export_is_byte_identical(hf_model_dir, tmp_path, tied):
    source = hf_model_dir(tied=tied)
    run = tmp_path / "run"
    folder = import_hf(source, run)
    assert folder == ckpt.checkpoint_path(run, 0) and (run / "tokenizer" / "tokenizer.json").is_file()
    out = export_hf(run, tmp_path / "exported", "fp32")

    before, after = safetensors_tensors(source), safetensors_tensors(out)
    assert sorted(before) == sorted(after)
    assert ("lm_head.weight" in after) is not tied  # transformers omits a tied head, and so do we
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and after[name].shape == tensor.shape, name
        assert after[name].numpy().tobytes() == tensor.numpy().tobytes(), name

    config_a = transformers.AutoConfig.from_pretrained(source).to_dict()
    config_b = transformers.AutoConfig.from_pretrained(out).to_dict()
    for key in ("transformers_version", "_name_or_path"):
        config_a.pop(key, None), config_b.pop(key, None)
    assert config_a == config_b

    x = tokens(config_a["vocab_size"])
    original, exported, ours = hf_model(source), hf_model(out), load_pretrained(run).model
    with torch.no_grad():
        reference = original(x).logits
        assert torch.equal(exported(x).logits, reference)
        torch.testing.assert_close(ours(x), reference, atol=1e-5, rtol=0)


def test_imported_run_works_with_generate_and_export_commands(hf_model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    main(["import", "hf", "--model", str(hf_model_dir()), "--out", str(run)])
    main(["generate", "--checkpoint", str(run), "--prompt", "the model", "--greedy", "--max-new-tokens", "5"])
    assert capsys.readouterr().out.splitlines()[-1].startswith("the model")
    main(["export", "hf", "--checkpoint", str(run), "--out", str(tmp_path / "hf"), "--dtype", "bf16"])
    assert (tmp_path / "hf" / "model.safetensors").is_file()


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory) -> Path:
    return export_hf(trained_run, tmp_path_factory.mktemp("exported") / "hf", "fp32")


def test_trained_run_export_loads_in_transformers_with_equal_logits(trained_run, exported):
    pre = load_pretrained(trained_run)
    model = hf_model(exported)
    assert model.config.tie_word_embeddings is pre.model_config.tie_embeddings
    assert json.loads((exported / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    x = tokens(pre.model_config.vocab_size, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, pre.model(x), atol=1e-5, rtol=0)


def test_trained_run_export_generates_like_llamita(trained_run, exported):
    pre = load_pretrained(trained_run)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    prompt = "def f3(y):\n    x0 ="
    ids = pre.tokenizer.encode(prompt, bos=True)
    assert hf_tokenizer(prompt).input_ids == ids
    greedy = SamplingParams(temperature=0.0, max_tokens=32)
    ours = LLM(pre.model, pre.tokenizer, max_batch=1).generate(ids, greedy)[0].token_ids
    theirs = hf_model(exported).generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)
    assert len(set(ours)) > 3  # a trained model's continuation, not one repeated token
    assert theirs[0, len(ids) :].tolist() == ours
    assert hf_tokenizer.decode(ours, skip_special_tokens=True) == pre.tokenizer.decode(ours)


def test_bf16_export_holds_bf16_tensors(trained_run, tmp_path):
    out = export_hf(trained_run, tmp_path / "bf16", "bf16")
    tensors = safetensors_tensors(out)
    reference = load_pretrained(trained_run).model.state_dict()
    for name, tensor in tensors.items():
        assert tensor.dtype == torch.bfloat16, name
        assert torch.equal(tensor, reference[name].to(torch.bfloat16)), name
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert hf_model(out).dtype == torch.bfloat16


def test_sharded_export_has_a_correct_index_and_loads(trained_run, exported, tmp_path):
    out = export_hf(trained_run, tmp_path / "sharded", "fp32", max_shard_bytes=60_000)
    files = sorted(out.glob("model-*.safetensors"))
    assert len(files) > 2 and not (out / "model.safetensors").exists()
    assert files[0].name == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = safetensors_tensors(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            assert all(index["weight_map"][name] == file.name for name in f.keys())
    assert sorted(index["weight_map"]) == sorted(tensors)
    single = safetensors_tensors(exported)
    assert all(torch.equal(tensors[n], single[n]) for n in single)
    x = tokens(single["model.embed_tokens.weight"].shape[0], seed=2)
    with torch.no_grad():
        assert torch.equal(hf_model(out)(x).logits, hf_model(exported)(x).logits)
    # Re-importing the shards reads them through the index.
    run = tmp_path / "reimported"
    import_hf(out, run)
    assert all(torch.equal(load_pretrained(run).model.state_dict()[n], single[n]) for n in single)


def test_export_of_a_multi_rank_fsdp_checkpoint(debug_config, tmp_path):
    """Two gloo ranks write each tensor in halves; export reassembles them without a process group."""
    cfg = debug_config(tmp_path / "fsdp", **{"train.max_steps": "2", "checkpoint.interval": "2", "eval.interval": "2"})
    recipe = tmp_path / "fsdp.yaml"
    save_config(cfg, recipe)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += ["-m", "llamita.cli", "pretrain", "--config", str(recipe)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    folder = ckpt.resolve_checkpoint(cfg.out_dir)
    assert len(list(folder.glob("*.distcp"))) == 2
    out = export_hf(cfg.out_dir, tmp_path / "hf")
    reference = load_pretrained(cfg.out_dir).model.state_dict()
    for name, tensor in safetensors_tensors(out).items():
        assert torch.equal(tensor, reference[name]), name


def test_bin_weights_are_read_with_weights_only(hf_model_dir, tmp_path):
    source = hf_model_dir()
    as_bin = tmp_path / "bin"
    as_bin.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (as_bin / name).write_bytes((source / name).read_bytes())
    torch.save(safetensors_tensors(source), as_bin / "pytorch_model.bin")
    config, weights = load_hf_state_dict(as_bin)
    expected = safetensors_tensors(source)
    assert config.vocab_size == expected["model.embed_tokens.weight"].shape[0]
    assert {name: t for name, t in weights}.keys() == expected.keys()
    assert all(torch.equal(weights.load(n), expected[n]) for n in expected)


class _Payload:
    """Unpickling this runs code: it creates the file named `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_malicious_pickle_is_refused(hf_model_dir, tmp_path):
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.json").write_bytes((hf_model_dir() / "config.json").read_bytes())
    marker = tmp_path / "pwned"
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "payload": _Payload(marker)}, evil / "pytorch_model.bin")
    with pytest.raises(HFFormatError, match="refused to unpickle"):
        load_hf_state_dict(evil)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_parameters"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"head_dim": 32}, "head_dim"),
        ({"model_type": "mistral"}, "model_type"),
        ({"hidden_size": None}, "hidden_size"),
    ],
)
def test_import_refuses_unsupported_configs_naming_the_field(hf_model_dir, tmp_path, changes, field):
    model_dir = edit_config(hf_model_dir(), tmp_path / "edited", **changes)
    with pytest.raises(HFFormatError, match=field):
        import_hf(model_dir, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_import_refuses_weights_that_do_not_fit_the_config(hf_model_dir, tmp_path):
    model_dir = edit_config(hf_model_dir(), tmp_path / "edited", num_hidden_layers=3)
    with pytest.raises(HFFormatError, match="missing model.layers.2"):
        import_hf(model_dir, tmp_path / "run")
    model_dir = edit_config(hf_model_dir(), tmp_path / "edited2", intermediate_size=128)
    with pytest.raises(HFFormatError, match="shape"):
        import_hf(model_dir, tmp_path / "run")


def test_export_refuses_a_missing_checkpoint(tmp_path, capsys):
    with pytest.raises(ckpt.CheckpointError, match="no such run directory"):
        export_hf(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "hf", "--checkpoint", str(tmp_path / "empty"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "llamita export: error:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_import_refuses_a_directory_without_config(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["import", "hf", "--model", str(tmp_path), "--out", str(tmp_path / "run")])
    assert "config.json: not found" in capsys.readouterr().err


def test_imported_checkpoint_records_its_source(hf_model_dir, tmp_path):
    source = hf_model_dir(tied=True)
    folder = import_hf(source, tmp_path / "run")
    state = ckpt.read_state(folder)
    assert state["step"] == 0 and state["imported_from"] == str(source.resolve())
    assert state["model_config"]["tie_embeddings"] is True and state["model_config"]["rope_theta"] == 5000.0
    assert RunConfig().optim == load_pretrained(tmp_path / "run").run_config.optim
    with pytest.raises(ckpt.CheckpointError, match="already a run directory"):
        import_hf(source, tmp_path / "run")
