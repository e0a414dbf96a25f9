"""LoRA from outside the model, checked against peft on transformers' Llama: names, frozen base, gradients, merging,
adapter and merged exports, the adapters-only checkpoint, compile + FSDP2 in one process and FSDP2 on 2 gloo ranks."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from llamita.chat.lora import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    LoRAConfig,
    LoRALinear,
    apply_lora,
    export_merged_hf,
    export_peft_adapter,
    init_lora_weights,
    lora_state_dict,
    merge_lora,
    read_lora_checkpoint,
    trainable_parameter_names,
)
from llamita.config import OptimConfig
from llamita.interop.checkpoint_io import CheckpointReader, weight_names, write_checkpoint
from llamita.model import Llama, ModelConfig
from llamita.train import checkpoint as ckpt
from llamita.train.optim import build_optimizer
from llamita.train.parallel import apply_compile, apply_fsdp, build_mesh

CONFIG = ModelConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=96, max_seq_len=64)
LORA = LoRAConfig(rank=4, alpha=8.0)
PROJECTIONS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
PROJECTIONS += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
ADAPTED = [f"model.layers.{i}.{p}" for i in range(CONFIG.n_layers) for p in PROJECTIONS]


def base_model(tied: bool = False) -> Llama:
    torch.manual_seed(0)
    return Llama(dataclasses.replace(CONFIG, tie_embeddings=tied))


def with_lora(tied: bool = False, config: LoRAConfig = LORA) -> Llama:
    """The base model with adapters whose B is random (not peft's zeros), so that the adapters change the output."""
    model = base_model(tied)
    apply_lora(model, config)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.weight.normal_(std=0.1)
    return model


def tokens(batch: int = 2) -> torch.Tensor:
    return torch.randint(0, CONFIG.vocab_size, (batch, 17), generator=torch.Generator().manual_seed(1))


def base_state_dict(model: Llama) -> dict[str, torch.Tensor]:
    return {name: t for name, t in model.state_dict().items() if ".lora_" not in name}


def transformers_llama(model: Llama):
    """transformers' LlamaForCausalLM holding `model`'s base weights."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**model.config.to_hf_config_dict()))
    hf.load_state_dict(base_state_dict(model), strict=True)
    return hf.eval()


def tiny_tokenizer():
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import WordLevel

    from llamita.tokenizer import Tokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, CONFIG.vocab_size)}}
    return Tokenizer(Backend(WordLevel(vocab, unk_token="<unk>")))


@dataclasses.dataclass
class StateDictWeights:
    """A `WeightSource` over an in-memory state dict."""

    model_config: ModelConfig
    state_dict: dict[str, torch.Tensor]

    @property
    def names(self) -> list[str]:
        return weight_names(self.model_config)

    def load(self, name: str) -> torch.Tensor:
        return self.state_dict[name]


# ---------------------------------------------------------------------------------------------- apply
def test_adapters_are_named_as_peft_names_them_and_start_as_a_no_op():
    plain = base_model()
    model = base_model()
    assert apply_lora(model, LORA) == ADAPTED
    lora_names = [f"{m}.{f}.weight" for m in ADAPTED for f in ("lora_A", "lora_B")]
    # The base keeps its Hugging Face names and values; the factors are added beside them.
    assert set(model.state_dict()) == set(plain.state_dict()) | set(lora_names)
    for name, tensor in plain.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    assert trainable_parameter_names(model) == lora_names
    assert list(lora_state_dict(model)) == lora_names

    q = model.model.layers[0].self_attn.q_proj
    assert q.lora_A.weight.shape == (LORA.rank, CONFIG.dim) and q.lora_B.weight.shape == (CONFIG.dim, LORA.rank)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            a, b = module.lora_A.weight, module.lora_B.weight
            assert 0 < a.abs().max() <= 1 / module.in_features**0.5  # kaiming-uniform, a = sqrt(5)
            assert not b.any() and module.scale == LORA.alpha / LORA.rank
    x = tokens()
    assert torch.equal(model(x), plain(x))


def test_a_meta_device_build_initialises_its_adapters_after_to_empty():
    with torch.device("meta"):
        model = Llama(CONFIG)
    apply_lora(model, LORA)
    model.to_empty(device="cpu")
    model.init_weights()  # treats the factors as base linears: B is no longer 0
    init_lora_weights(model)
    q = model.model.layers[0].self_attn.q_proj
    assert not q.lora_B.weight.any() and 0 < q.lora_A.weight.abs().max() <= 1 / CONFIG.dim**0.5


def test_only_the_factors_get_gradients():
    model = with_lora()
    x = tokens()
    model(x, targets=x).backward()
    for name, p in model.named_parameters():
        if ".lora_" in name:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    assert {id(p) for p in build_optimizer(model, OptimConfig(), torch.device("cpu")).param_groups[0]["params"]} == {
        id(p) for name, p in model.named_parameters() if ".lora_" in name
    }


def test_dropout_acts_on_the_adapter_input_only():
    x = tokens()
    fresh = base_model()
    apply_lora(fresh, LoRAConfig(rank=4, alpha=8.0, dropout=0.5))
    fresh.train()
    assert torch.equal(fresh(x), base_model()(x))  # B = 0: nothing of the base path is dropped

    model = with_lora(config=LoRAConfig(rank=4, alpha=8.0, dropout=0.5)).train()
    assert not torch.equal(model(x), model(x))
    assert torch.equal(model.eval()(x), with_lora()(x))


@pytest.mark.parametrize(
    ("targets", "needle"),
    [
        (("qq_proj",), "'qq_proj' matches no module"),
        (("lm_head",), "only the blocks' linear layers"),
        (("self_attn",), r"self_attn \(Attention\), which is not an nn.Linear"),
        (("embed_tokens",), r"embed_tokens \(Embedding\), which is not"),
    ],
)
def test_bad_targets_say_what_is_wrong(targets, needle):
    with pytest.raises(ValueError, match=needle):
        apply_lora(base_model(), LoRAConfig(targets=targets))


def test_bad_settings_and_a_second_apply_are_refused():
    for field, value in (("rank", 0), ("rank", 2.0), ("alpha", 0), ("dropout", 1.0), ("targets", [])):
        with pytest.raises(ValueError, match=f"LoRAConfig.{field}"):
            LoRAConfig(**{field: value})
    assert LoRAConfig(targets=["q_proj"]).targets == ("q_proj",)
    model = base_model()
    apply_lora(model, LORA)
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        apply_lora(model, LORA)


# --------------------------------------------------------------------------------- merge and peft
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_unmerged_merged_and_peft_compute_the_same(tmp_path, tied):
    peft = pytest.importorskip("peft")
    model = with_lora(tied).eval()
    x = tokens()
    with torch.no_grad():
        ours = model(x)  # [B, T, V]
        assert (ours - base_model(tied)(x)).abs().max() > 1e-2  # the adapters matter

        merged = copy.deepcopy(model)
        assert merge_lora(merged) == ADAPTED
        assert not any(isinstance(m, LoRALinear) for m in merged.modules())
        assert list(merged.state_dict()) == list(base_model(tied).state_dict())  # a plain Llama's names
        assert (merged.lm_head.weight is merged.model.embed_tokens.weight) == tied
        torch.testing.assert_close(merged(x), ours, rtol=0, atol=1e-5)

    hf = transformers_llama(model)
    hf.save_pretrained(tmp_path / "base")
    adapter_dir = export_peft_adapter(lora_state_dict(model), LORA, tmp_path / "adapter", tmp_path / "base")
    peft_model = peft.PeftModel.from_pretrained(hf, adapter_dir).eval()
    assert peft_model.peft_config["default"].r == LORA.rank
    assert peft_model.peft_config["default"].lora_alpha == LORA.alpha
    assert set(peft_model.peft_config["default"].target_modules) == set(LORA.targets)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x).logits, ours, rtol=0, atol=1e-5)

    # peft saves what it loaded under the same names and values, and its merge is ours.
    peft_model.save_pretrained(tmp_path / "resaved")
    with (
        safe_open(str(adapter_dir / ADAPTER_WEIGHTS_FILE), "pt") as a,
        safe_open(str(tmp_path / "resaved" / ADAPTER_WEIGHTS_FILE), "pt") as b,
    ):
        assert sorted(a.keys()) == sorted(b.keys())
        assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in a.keys()
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
    written = json.loads((adapter_dir / ADAPTER_CONFIG_FILE).read_text())
    assert written["peft_type"] == "LORA" and written["task_type"] == "CAUSAL_LM"
    assert written["base_model_name_or_path"] == str(tmp_path / "base")
    peft_merged = peft_model.merge_and_unload().state_dict()
    for name, tensor in merged.state_dict().items():
        torch.testing.assert_close(peft_merged[name], tensor, rtol=0, atol=1e-6)


def test_adapter_export_refuses_mismatched_settings_and_overwrites(tmp_path):
    adapters = lora_state_dict(with_lora())
    with pytest.raises(ValueError, match="configured rank r = 8"):
        export_peft_adapter(adapters, LoRAConfig(rank=8), tmp_path, "base")
    with pytest.raises(ValueError, match="not both lora_A and lora_B"):
        export_peft_adapter({k: v for k, v in adapters.items() if "lora_B" not in k}, LORA, tmp_path, "base")
    export_peft_adapter(adapters, LORA, tmp_path, "base")
    with pytest.raises(FileExistsError, match="already holds an adapter"):
        export_peft_adapter(adapters, LORA, tmp_path, "base")
    export_peft_adapter(adapters, LORA, tmp_path, "base", force=True)


# ------------------------------------------------------------------------------ checkpoints, merged export
def test_adapters_only_checkpoint_resumes_and_exports_merged(tmp_path):
    """A LoRA run: the base comes from a checkpoint; the run's checkpoints hold the factors and their optimizer
    state only (DCP's ignore_frozen_params); the merged export streams base + adapters into a transformers model."""
    transformers = pytest.importorskip("transformers")
    model = with_lora()
    x = tokens()
    optimizer = build_optimizer(model, OptimConfig(lr=1e-2, warmup_steps=0), torch.device("cpu"))
    model(x, targets=x).backward()
    optimizer.step()

    only_trainable = StateDictOptions(ignore_frozen_params=True, strict=False)  # the base is not in it
    model_sd, optim_sd = get_state_dict(model, optimizer, options=only_trainable)
    assert list(model_sd) == trainable_parameter_names(model)
    folder = ckpt.checkpoint_path(tmp_path / "sft", 1)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=folder)
    (folder / ckpt.STATE_FILE).write_text("{}")

    adapters = read_lora_checkpoint(tmp_path / "sft")
    expected = lora_state_dict(model)
    assert sorted(adapters) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(adapters[name], tensor), name

    resumed = with_lora()  # a restarted run: base weights loaded again, adapters and optimizer from the checkpoint
    resumed_optimizer = build_optimizer(resumed, OptimConfig(lr=1e-2, warmup_steps=0), torch.device("cpu"))
    model_sd, optim_sd = get_state_dict(resumed, resumed_optimizer, options=only_trainable)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=folder)
    set_state_dict(
        resumed,
        resumed_optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=only_trainable,
    )
    for name, tensor in expected.items():
        assert torch.equal(resumed.get_parameter(name), tensor), name
    for p, q in zip(model.parameters(), resumed.parameters()):
        if p.requires_grad:
            assert torch.equal(optimizer.state[p]["exp_avg"], resumed_optimizer.state[q]["exp_avg"])

    write_checkpoint(tmp_path / "base", StateDictWeights(CONFIG, base_state_dict(model)))
    out = export_merged_hf(CheckpointReader(tmp_path / "base"), adapters, LORA, tmp_path / "hf", tiny_tokenizer())
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model.eval()(x), rtol=0, atol=1e-5)


def test_read_lora_checkpoint_refuses_a_checkpoint_without_adapters(tmp_path):
    write_checkpoint(tmp_path / "base", StateDictWeights(CONFIG, base_model().state_dict()))
    with pytest.raises(ckpt.CheckpointError, match="no LoRA adapter tensors"):
        read_lora_checkpoint(tmp_path / "base")


# ---------------------------------------------------------------------------------- compile and FSDP2
def test_compiled_sharded_blocks_match_eager():
    """Per-block torch.compile (inductor on CPU) and FSDP2 on a one-process group around the adapted blocks."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = with_lora(tied=True)
    wrapped = copy.deepcopy(eager)
    apply_compile(wrapped)
    apply_fsdp(wrapped, build_mesh(1, 1, "cpu"), param_dtype=torch.float32)
    assert isinstance(wrapped.model.layers[0].self_attn.q_proj.lora_A.weight, DTensor)
    x = tokens()
    loss = wrapped(x, targets=x)
    loss.backward()
    reference = eager(x, targets=x)
    reference.backward()
    torch.testing.assert_close(loss, reference, rtol=0, atol=1e-5)
    assert counters["stats"]["unique_graphs"] >= 1  # the blocks ran compiled
    grads = {n: p.grad.full_tensor() for n, p in wrapped.named_parameters() if p.grad is not None}
    assert sorted(grads) == sorted(trainable_parameter_names(eager))
    for name, p in eager.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[name], p.grad, rtol=0, atol=1e-5)
    assert sorted(lora_state_dict(wrapped)) == sorted(lora_state_dict(eager))


FSDP_SCRIPT = """
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

sys.path.insert(0, sys.argv[1])
from test_lora import tokens, with_lora  # noqa: E402

from llamita.chat.lora import lora_state_dict  # noqa: E402
from llamita.train.parallel import apply_fsdp, end_distributed  # noqa: E402

dist.init_process_group("gloo")
torch.set_num_threads(1)
rank = dist.get_rank()
model = with_lora(tied=True)
apply_fsdp(model, init_device_mesh("cpu", (2,)), param_dtype=torch.float32)
x = tokens(4)[rank::2]  # this rank's half of the batch
model(x, targets=x).backward()
grads = {name: p.grad.full_tensor() for name, p in model.named_parameters() if p.grad is not None}
torch.save({"grads": grads, "adapters": lora_state_dict(model)}, f"{sys.argv[2]}.{rank}")
end_distributed()  # no rank tears the group down while a peer still uses it
"""


def test_fsdp2_on_two_ranks_reduces_only_the_adapters_gradients(tmp_path):
    """Frozen base and trainable factors in one FSDP2 group per block: two ranks' half-batches give the
    one-process full-batch gradients of the factors, and the base gets none."""
    script = tmp_path / "fsdp_lora.py"
    script.write_text(FSDP_SCRIPT)
    out = tmp_path / "result"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)]
    command += [str(Path(__file__).parent), str(out)]
    proc = subprocess.run(
        command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"{' '.join(command)} failed:\n{proc.stderr[-6000:]}"

    model = with_lora(tied=True)
    x = tokens(4)
    model(x, targets=x).backward()
    expected = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    for rank in (0, 1):
        got = torch.load(f"{out}.{rank}", weights_only=True)
        assert sorted(got["grads"]) == sorted(expected) == sorted(trainable_parameter_names(model))
        for name, grad in expected.items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=0, atol=1e-5)
        for name, tensor in lora_state_dict(model).items():
            assert torch.equal(got["adapters"][name], tensor), name
