"""Parallelism applied from outside, in one process: config checks, the FSDP/dtype plan, activation checkpointing,
FSDP2 on a one-process group (tied embeddings, names), compile, and float8 (GPU only)."""

from __future__ import annotations

import collections
import copy
import dataclasses
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llamita.config import ConfigError, load_config
from llamita.model import Llama, get_preset
from llamita.pretrain import pretrain
from llamita.train.metrics import read_metrics
from llamita.train.parallel import (
    DistEnv,
    apply_activation_checkpointing,
    apply_compile,
    apply_float8,
    apply_fsdp,
    build_mesh,
    float8_filter,
    init_distributed,
    plan_parallel,
)

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _losses(run) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def _tiny(tie: bool = True) -> Llama:
    torch.manual_seed(0)
    return Llama(dataclasses.replace(get_preset("debug"), tie_embeddings=tie))


# ------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("parallel.fsdp", "maybe"),
        ("parallel.activation_checkpoint", "some"),
        ("parallel.dp_replicate", "two"),
        ("parallel.compile", "perhaps"),
        ("train.dtype", "fp16"),
    ],
)
def test_bad_parallel_values_name_the_field(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("debug", {key: value})


def test_yaml_on_off_and_defaults(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("parallel:\n  fsdp: off\n  activation_checkpoint: full\n")  # YAML 1.1 reads off as false
    cfg = load_config(str(recipe))
    assert cfg.parallel.fsdp == "off" and cfg.parallel.activation_checkpoint == "full"
    assert dataclasses.asdict(load_config("debug").parallel) == {
        "fsdp": "auto",
        "copies": "auto",
        "dp_replicate": 1,
        "reshard_after_forward": True,
        "activation_checkpoint": "none",
        "compile": False,
        "float8": False,
    }


@pytest.mark.parametrize(
    ("world", "device", "fsdp", "copies", "dtype", "expect"),
    [
        (1, CPU, "auto", "auto", "auto", (False, False, torch.float32, None)),
        (2, CPU, "auto", "auto", "auto", (True, False, torch.float32, None)),
        (1, CPU, "on", "auto", "auto", (True, False, torch.float32, None)),
        (1, CPU, "auto", "auto", "bf16", (False, False, torch.bfloat16, torch.bfloat16)),  # autocast on a CPU
        (1, CPU, "auto", "on", "bf16", (False, True, torch.bfloat16, None)),
        (1, CUDA, "auto", "auto", "auto", (False, True, torch.bfloat16, None)),  # one GPU: bf16 compute copies
        (1, CUDA, "auto", "off", "auto", (True, False, torch.bfloat16, None)),  # FSDP2 casts: no autocast on top
        (1, CUDA, "on", "auto", "auto", (True, False, torch.bfloat16, None)),
        (1, CUDA, "off", "off", "auto", (False, False, torch.bfloat16, torch.bfloat16)),  # fp32 weights, autocast
        (1, CUDA, "auto", "auto", "fp32", (True, False, torch.float32, None)),
        (1, CUDA, "auto", "auto", "ac", (True, False, torch.bfloat16, None)),  # recomputation needs FSDP2's hooks
        (8, CUDA, "auto", "auto", "auto", (True, False, torch.bfloat16, None)),
    ],
)
def test_plan_decides_fsdp_copies_and_autocast_once(world, device, fsdp, copies, dtype, expect):
    overrides = {"parallel.fsdp": fsdp, "parallel.copies": copies, "train.dtype": dtype}
    if dtype == "ac":  # bf16 with activation checkpointing
        overrides.update({"train.dtype": "bf16", "parallel.activation_checkpoint": "selective"})
    cfg = load_config("debug", overrides)
    plan = plan_parallel(cfg, DistEnv(rank=0, local_rank=0, world_size=world, device=device))
    assert (plan.fsdp, plan.copies, plan.compute_dtype, plan.autocast_dtype) == expect


@pytest.mark.parametrize(
    ("world", "overrides", "needle"),
    [
        (2, {"parallel.fsdp": "off"}, "parallel.fsdp=off with 2 processes"),
        (4, {"parallel.dp_replicate": "3"}, "parallel.dp_replicate=3"),
        (1, {"parallel.dp_replicate": "1", "parallel.float8": "true"}, "parallel.float8 needs a CUDA GPU"),
        (2, {"parallel.copies": "on", "train.dtype": "bf16"}, "parallel.copies=on needs one process"),
        (1, {"parallel.copies": "on", "train.dtype": "fp32"}, "parallel.copies=on needs .* train.dtype bf16"),
        (1, {"parallel.copies": "on", "parallel.fsdp": "on", "train.dtype": "bf16"}, "parallel.fsdp auto or off"),
        (
            1,
            {"parallel.copies": "on", "train.dtype": "bf16", "parallel.activation_checkpoint": "full"},
            "does not work with parallel.activation_checkpoint=full",
        ),
    ],
)
def test_plan_refuses_impossible_settings(world, overrides, needle):  # (dp_replicate 0: test_config's ranges)
    cfg = load_config("debug", overrides)
    with pytest.raises(ConfigError, match=needle):
        plan_parallel(cfg, DistEnv(rank=0, local_rank=0, world_size=world, device=CPU))


# ---------------------------------------------------------------------------------------- float8
def test_float8_says_how_to_install_torchao(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # makes `import torchao.float8` fail
    with pytest.raises(ConfigError, match="pip install torchao"):
        apply_float8(_tiny(), CUDA)  # refused before any CUDA call
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        apply_float8(_tiny(), CPU)


def test_float8_converts_only_the_blocks_big_linears():
    model = Llama(get_preset("demo"))  # dim 256, MLP 688 = 43 x 16, vocab 4096
    chosen = {name for name, m in model.named_modules() if float8_filter(m, name)}
    assert "lm_head" not in chosen and chosen
    assert chosen == {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    debug = _tiny()  # MLP 172 is not a multiple of 16: those layers stay in bf16
    chosen = {name for name, m in debug.named_modules() if float8_filter(m, name)}
    assert chosen and not any("mlp" in n for n in chosen)


@pytest.mark.gpu
def test_float8_training_step_on_gpu():
    pytest.importorskip("torchao")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 matmuls need compute capability >= 8.9")
    from torchao.float8.float8_linear import Float8Linear

    with torch.device("cuda"):
        model = Llama(get_preset("demo"))
    names = set(model.state_dict())
    apply_float8(model, CUDA)
    assert set(model.state_dict()) == names
    assert isinstance(model.model.layers[0].mlp.down_proj, Float8Linear)
    assert not isinstance(model.lm_head, Float8Linear)
    tokens = torch.randint(0, 4096, (2, 64), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(tokens, targets=tokens)
    loss.backward()
    assert torch.isfinite(loss) and model.model.layers[0].mlp.down_proj.weight.grad is not None


# ------------------------------------------------------------------------------- activation ckpt
class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def test_activation_checkpointing_recomputes_what_it_says_and_keeps_names():
    """Same loss and gradients; backward recomputes nothing (none), the cheap ops (selective) or all (full)."""
    base = _tiny()
    tokens = torch.randint(0, 256, (2, 16))
    targets = torch.randint(0, 256, (2, 16))
    grads, counts = {}, {}
    for mode in ("none", "selective", "full"):
        model = copy.deepcopy(base)
        apply_activation_checkpointing(model, mode)
        assert list(model.state_dict()) == list(base.state_dict())  # no _checkpoint_wrapped_module.
        assert model.lm_head.weight is model.model.embed_tokens.weight
        loss = model(tokens, targets=targets)
        with _OpCounter() as counter:
            loss.backward()
        counts[mode] = counter.counts
        grads[mode] = {n: p.grad for (n, _), p in zip(base.named_parameters(), model.parameters(), strict=True)}
    for mode in ("selective", "full"):
        for name, grad in grads["none"].items():
            torch.testing.assert_close(grads[mode][name], grad, rtol=0, atol=1e-7, msg=f"{mode}: {name}")
    assert counts["selective"]["mm"] == counts["none"]["mm"] < counts["full"]["mm"]  # matmuls kept
    assert counts["none"]["silu"] == 0 < counts["selective"]["silu"] == counts["full"]["silu"]  # recomputed


def test_activation_checkpointing_trains_identically(debug_config, tmp_path):
    runs = {}
    for mode in ("none", "selective", "full"):
        runs[mode] = tmp_path / mode
        cfg = debug_config(
            runs[mode],
            **{"train.max_steps": "6", "parallel.activation_checkpoint": mode, "eval.interval": "0"},
        )
        pretrain(cfg)
    reference = _losses(runs["none"])
    assert len(reference) == 6
    for mode in ("selective", "full"):
        assert _losses(runs[mode]) == pytest.approx(reference, abs=1e-6)


# --------------------------------------------------------------------------------------- FSDP2
def test_fsdp_keeps_tied_embeddings_and_hf_names():
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.tensor import DTensor

    for tie in (True, False):
        model = _tiny(tie)
        names = list(model.state_dict())
        tokens = torch.randint(0, 256, (2, 16))
        expected = model(tokens, targets=tokens).item()
        apply_activation_checkpointing(model, "full")
        apply_fsdp(model, build_mesh(1, 1, "cpu"), param_dtype=torch.float32)
        assert isinstance(model.model.embed_tokens.weight, DTensor)
        assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
        assert list(get_model_state_dict(model)) == names
        loss = model(tokens, targets=tokens)
        loss.backward()
        assert loss.item() == pytest.approx(expected, abs=1e-6)
        assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
        torch.distributed.destroy_process_group()


def test_fsdp_on_one_process_matches_plain(debug_config, tmp_path):
    """`parallel.fsdp on` in a plain process (a private one-process group) trains like no FSDP, and cleans up."""
    plain, sharded = tmp_path / "plain", tmp_path / "fsdp"
    common = {"train.max_steps": "4", "eval.interval": "0", "model.tie_embeddings": "true"}
    pretrain(debug_config(plain, **common))
    pretrain(debug_config(sharded, **common, **{"parallel.fsdp": "on"}))
    assert not torch.distributed.is_initialized()
    assert _losses(sharded) == pytest.approx(_losses(plain), abs=1e-5)


# ------------------------------------------------------------------------------------- compile
def test_compiled_blocks_keep_static_shapes(debug_config, tmp_path):
    """A batch of another size gets its own graph instead of turning the training graph shape-generic (dynamo's
    automatic dynamic shapes), and the trainer validates without compiling at all."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = _tiny()
    apply_compile(model)
    vocab = model.config.vocab_size
    for batch in (8, 5, 6, 8):
        x = torch.randint(0, vocab, (batch, 16))
        model(x, targets=x).backward()
    assert counters["stats"]["unique_graphs"] == 3  # static: one per size; automatic dynamic would make 2

    torch._dynamo.reset()
    counters.clear()
    run = tmp_path / "run"  # validation (step 0, 20, 40) batches of 3 sequences, training micro-batches of 4
    pretrain(debug_config(run, **{"parallel.compile": "true", "eval.batch_size": "3", "train.max_steps": "3"}))
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    counters.clear()
    pretrain(
        debug_config(tmp_path / "no-val", **{"parallel.compile": "true", "eval.interval": "0", "train.max_steps": "3"})
    )
    assert graphs == counters["stats"]["unique_graphs"]  # validation added no graph


def test_compile_with_selective_checkpointing_and_fsdp_on_cpu(debug_config, tmp_path):
    """The whole stack on inductor's CPU backend: compiled blocks, selective AC, FSDP2; same losses as eager."""
    common = {"train.max_steps": "2", "eval.interval": "0", "checkpoint.interval": "0"}
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    pretrain(debug_config(eager, **common))
    stack = {"parallel.compile": "true", "parallel.activation_checkpoint": "selective", "parallel.fsdp": "on"}
    pretrain(debug_config(compiled, **common, **stack))
    assert _losses(compiled) == pytest.approx(_losses(eager), abs=1e-5)


def test_init_distributed_in_a_plain_process(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert init_distributed("cpu") == DistEnv(rank=0, local_rank=0, world_size=1, device=CPU)
    assert not torch.distributed.is_initialized()
