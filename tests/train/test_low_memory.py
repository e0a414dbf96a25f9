"""The low-memory mode (`train.weights` bf16, `optim.name` adamw8bit): steps against torchao's optimizers stepped
directly, stochastic rounding against round-to-nearest, skipped steps, the plan and config checks, bf16 gradients,
and bit-exact resume of a pretraining run.

torchao's optimizers `torch.compile` one update per parameter shape (Inductor's C++ backend here): the first run of
this file compiles them (about 7 s per shape on 2 cores), later runs read Inductor's on-disk cache (about 1 s).
"""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from checkpoint_compare import assert_same_checkpoint, checkpoint_contents
from llamita.config import ConfigError, OptimConfig, check_config
from llamita.pretrain import pretrain
from llamita.pretrained import load_pretrained
from llamita.train import checkpoint as ckpt
from llamita.train.metrics import read_metrics
from llamita.train.optim import build_optimizer, clipped_step, gradient_norm, set_lr
from llamita.train.parallel import DistEnv, parallelize, plan_parallel
from pretrain_runs import finish, torchrun, train_rows

torchao_optim = pytest.importorskip("torchao.optim")
from torchao.optim.subclass_8bit import OptimState8bit  # noqa: E402

CPU = torch.device("cpu")


def _model() -> nn.Module:
    """A 128 x 64 matrix (quantized by AdamW8bit: 8192 values, 32 blocks of 256) and a norm (too small to be), bf16."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128, bias=False), nn.LayerNorm(128, bias=False))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    return model.to(torch.bfloat16)


def _grads(model: nn.Module, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g).to(p.dtype) for p in model.parameters()]


def _groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """The groups `build_optimizer` makes: decay on the matrix, none on the norm."""
    return [
        {"params": [model[0].weight], "weight_decay": weight_decay},
        {"params": [model[1].weight], "weight_decay": 0.0},
    ]


def _set(model: nn.Module, grads: list[torch.Tensor]) -> None:
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()


@pytest.mark.parametrize("name", ["adamw8bit", "adamw"])
def test_a_step_equals_torchaos_optimizer_stepped_directly(name):
    """Three steps through `clipped_step` (clipping on, a schedule's lr set each step) against torchao's optimizer
    on a copy of the same bf16 parameters, fed the clipped gradients and the same RNG. The first step bit for bit
    (its update reads fp32 moments in both); then AdamW8bit's quantized matrix, its 8-bit codes and scales bit for
    bit, and what llamita keeps in fp32 where torchao keeps bf16 (`_AdamW`'s moments, the norm's) within the
    rounding noise, those moments equal to Adam's recurrences in float64."""
    cfg = OptimConfig(name=name, lr=1e-2, beta2=0.95, weight_decay=0.1)
    ours, theirs = _model(), _model()
    opt = build_optimizer(ours, cfg, CPU)
    kind = torchao_optim.AdamW8bit if name == "adamw8bit" else torchao_optim._AdamW
    ref = kind(_groups(theirs, 0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, bf16_stochastic_round=True)
    moments = [[torch.zeros(p.shape, dtype=torch.float64) for _ in range(2)] for p in ours.parameters()]
    for step, lr in enumerate([1e-2, 5e-3, 2e-3]):
        grads = _grads(ours, step)
        _set(ours, grads)
        set_lr(opt, lr)
        norm = gradient_norm(opt)
        coef = torch.clamp(0.5 / (norm + 1e-6), max=1.0)
        assert coef < 1  # the clipping takes effect
        torch.manual_seed(100 + step)  # the stochastic rounding's draws
        clipped_step(opt, norm, 0.5, torch.zeros(()))
        _set(theirs, [g * coef for g in grads])
        for group in ref.param_groups:
            group["lr"].fill_(lr)
        torch.manual_seed(100 + step)
        ref.step()
        for (m, v), p in zip(moments, ours.parameters()):
            g = p.grad.double()  # clipped in place, as the optimizer read it
            m.mul_(0.9).add_(g, alpha=0.1), v.mul_(0.95).add_(g * g, alpha=0.05)
        exact = step == 0 or name == "adamw8bit"
        for a, b in [(ours[0].weight, theirs[0].weight)] + [(ours[1].weight, theirs[1].weight)] * (step == 0):
            assert torch.equal(a, b) if exact else (a - b).abs().max() <= 2 * 2**-7 * b.abs().max(), step
    mine, torchaos = opt.state[ours[0].weight], ref.state[theirs[0].weight]
    assert mine["step"] == torchaos["step"] == 3
    for key in ("exp_avg", "exp_avg_sq"):
        if name == "adamw8bit":
            assert isinstance(mine[key], OptimState8bit) and mine[key].codes.dtype == torch.uint8
            assert torch.equal(mine[key].codes, torchaos[key].codes)
            assert torch.equal(mine[key].scale, torchaos[key].scale)
        assert opt.state[ours[1].weight][key].dtype == torch.float32  # torchao's: bf16
    fp32 = [(opt.state[ours[1].weight], moments[1])] + [(mine, moments[0])] * (name == "adamw")
    for state, (m, v) in fp32:
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
        torch.testing.assert_close(state["exp_avg"].double(), m, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(state["exp_avg_sq"].double(), v, rtol=1e-5, atol=1e-12)
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0


@pytest.mark.parametrize("name", ["AdamW8bit", "AdamW"])
def test_a_group_of_several_tensors_steps_as_torchao_steps_each(name):
    """llamita's step updates the tensors of a shape in one compiled call (as on a GPU): five tensors (a matrix,
    two quantized matrices of one shape in one call, a norm's weight and bias in another; fp32, so that no rounding
    draws differ between one graph and several) take the same three steps as torchao's per-tensor step, weights
    and 8-bit codes and scales bit for bit."""
    from llamita.train import torchao_adamw

    def model() -> nn.Module:
        torch.manual_seed(0)
        linears = [nn.Linear(64, 128, bias=False), nn.Linear(128, 128, bias=False), nn.Linear(128, 128, bias=False)]
        return nn.Sequential(*linears, nn.LayerNorm(128))

    ours, theirs = model(), model()
    kind = {"AdamW8bit": torchao_optim.AdamW8bit, "AdamW": torchao_optim._AdamW}[name]
    settings = {"lr": 1e-2, "betas": (0.9, 0.95), "weight_decay": 0.1}
    opt = getattr(torchao_adamw, name)(ours.parameters(), **settings)
    opt.most_per_call = 8
    assert [len(some) for some in torchao_adamw._groups_of_a_shape(list(ours.parameters()), 8)] == [1, 2, 2]
    ref = kind(theirs.parameters(), **settings)
    for step in range(3):
        _set(ours, _grads(ours, step))
        _set(theirs, _grads(theirs, step))
        opt.step()
        ref.step()
        assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters())), step
    for a, b in zip(ours.parameters(), theirs.parameters()):
        mine, torchaos = _plain(opt.state[a]), _plain(ref.state[b])
        assert mine.keys() == torchaos.keys() and mine["step"] == 3
        assert all(torch.equal(mine[k], torchaos[k]) for k in mine), (a.shape, [k for k in mine])
    assert name == "AdamW" or isinstance(opt.state[ours[0].weight]["exp_avg"], OptimState8bit)


def test_tensors_of_a_shape_are_updated_in_calls_of_one_length():
    """The lists a compiled update takes: of one shape, and of one length within a shape (the largest divisor of
    its count up to the most a call takes), so that each shape compiles one graph."""
    from llamita.train.torchao_adamw import _groups_of_a_shape

    def lengths(counts: dict[tuple, int], most: int) -> dict[tuple, list[int]]:
        params = [torch.empty(shape) for shape, n in counts.items() for _ in range(n)]
        out: dict[tuple, list[int]] = {}
        for some in _groups_of_a_shape(params, most):
            assert len({p.shape for p in some}) == 1
            out.setdefault(tuple(some[0].shape), []).append(len(some))
        return out

    # TinyLlama's: q and o, k and v, gate and up (44 each), down (22), norms (45), embeddings, head.
    counts = {(64, 64): 44, (16, 64): 44, (176, 64): 44, (64, 176): 22, (64,): 45, (1000, 64): 1, (64, 1000): 1}
    assert lengths(counts, 8) == {
        (64, 64): [4] * 11, (16, 64): [4] * 11, (176, 64): [4] * 11, (64, 176): [2] * 11, (64,): [5] * 9,
        (1000, 64): [1], (64, 1000): [1],
    }  # fmt: skip
    assert lengths({(8,): 7, (4,): 11}, 8) == {(8,): [7], (4,): [1] * 11}  # a prime over the most: one a call
    assert lengths({(8,): 6}, 1) == {(8,): [1] * 6}


def test_stochastic_rounding_keeps_updates_below_half_a_bf16_step():
    """Weights of 1.0 and an Adam step of lr = 1e-4, a fortieth of bf16's spacing below 1 (2^-8): round-to-nearest
    leaves every weight at 1.0; stochastic rounding moves a fortieth of them one spacing down, so that their mean
    is 1 - 1e-4 to within 6 standard deviations of the draws."""
    n = 1 << 16
    params = {rounding: nn.Parameter(torch.ones(n, dtype=torch.bfloat16)) for rounding in ("nearest", "stochastic")}
    ours = build_optimizer(nn.ParameterList([params["stochastic"]]), OptimConfig(lr=1e-4, weight_decay=0.0), CPU)
    nearest = torchao_optim._AdamW([params["nearest"]], lr=1e-4, weight_decay=0.0, bf16_stochastic_round=False)
    for p in params.values():
        p.grad = torch.ones(n, dtype=torch.bfloat16)  # Adam's first step: exactly lr in every coordinate
    clipped_step(ours, torch.ones(()), float("inf"), torch.zeros(()))
    nearest.step()
    assert torch.equal(params["nearest"], torch.ones(n, dtype=torch.bfloat16))
    moved = params["stochastic"].float()
    assert set(moved.unique().tolist()) == {1.0, 1.0 - 2**-8}
    spacing, p_down = 2**-8, 1e-4 / 2**-8
    sigma = spacing * (p_down * (1 - p_down) / n) ** 0.5
    assert abs(moved.double().mean().item() - (1 - 1e-4)) < 6 * sigma


@pytest.mark.parametrize("name", ["adamw8bit", "adamw"])
def test_a_skipped_step_changes_neither_weights_nor_optimizer_state(name):
    model = _model()
    opt = build_optimizer(model, OptimConfig(name=name, lr=1e-2), CPU)
    _set(model, _grads(model, 0))
    clipped_step(opt, gradient_norm(opt), 1.0, torch.zeros(()))
    weights = [p.detach().clone() for p in model.parameters()]
    state = [_plain(opt.state[p]) for p in model.parameters()]
    _set(model, [g * float("nan") for g in _grads(model, 1)])
    clipped_step(opt, gradient_norm(opt), 1.0, torch.ones(()))  # the guard's verdict on a NaN gradient
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    for before, p in zip(state, model.parameters()):
        after = _plain(opt.state[p])
        assert before.keys() == after.keys() and after["step"] == 1
        assert all(torch.equal(before[k], after[k]) for k in before), p.shape


def _plain(state: dict) -> dict[str, torch.Tensor]:
    """Copies of an optimizer state's tensors, an 8-bit moment as its codes and scales."""
    out = {}
    for key, value in state.items():
        if isinstance(value, OptimState8bit):
            out[f"{key}.codes"], out[f"{key}.scale"] = value.codes.clone(), value.scale.clone()
        else:
            out[key] = value.clone()
    return out


def _env() -> DistEnv:
    return DistEnv(rank=0, local_rank=0, world_size=1, device=CPU)


def test_bf16_weights_plan_one_process_without_fsdp_copies_or_autocast(debug_config, tmp_path):
    plan = plan_parallel(debug_config(tmp_path, **{"train.weights": "bf16"}), _env())
    assert (plan.fsdp, plan.copies, plan.autocast_dtype) == (False, False, None)
    assert plan.compute_dtype == plan.weights_dtype == torch.bfloat16  # train.dtype auto follows the weights
    assert plan_parallel(debug_config(tmp_path), _env()).weights_dtype == torch.float32


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"train.weights": "bf16", "train.dtype": "fp32"}, "train.weights=bf16 computes in bf16"),
        ({"train.weights": "bf16", "parallel.copies": "on"}, "parallel.copies=on: train.weights=bf16"),
        ({"optim.name": "adamw8bit", "parallel.copies": "on"}, "parallel.copies=on: optim.name=adamw8bit"),
    ],
)
def test_combinations_that_cannot_work_are_refused(debug_config, tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        check_config(debug_config(tmp_path, **overrides))


def test_8bit_moments_on_several_ranks_are_refused_at_the_start(debug_config, tmp_path):
    env = DistEnv(rank=0, local_rank=0, world_size=2, device=CPU)
    with pytest.raises(ConfigError, match="optim.name=adamw8bit runs in one process; this launch has 2"):
        plan_parallel(debug_config(tmp_path, **{"optim.name": "adamw8bit"}), env)
    plan = plan_parallel(debug_config(tmp_path, **{"train.weights": "bf16"}), env)  # bf16 AdamW shards
    assert plan.fsdp and plan.weights_dtype == torch.bfloat16


def test_without_torchao_the_error_says_what_to_install(debug_config, tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else find_spec(name, *a)
    )
    with pytest.raises(ConfigError, match=r"optim.name=adamw8bit .*pip install 'llamita\[quant\]'"):
        check_config(debug_config(tmp_path, **{"optim.name": "adamw8bit"}))


def test_bf16_weights_have_bf16_gradients():
    from llamita.config import ParallelConfig
    from llamita.model.config import PRESETS
    from llamita.pretrain import build_model

    model = build_model(PRESETS["debug"], CPU, seed=0)
    parallelize(model, ParallelConfig(), None, CPU, param_dtype=torch.bfloat16, weights_dtype=torch.bfloat16)
    tokens = torch.randint(0, 256, (2, 16))
    loss = model(tokens, targets=tokens)
    assert loss.dtype == torch.float32
    loss.backward()
    assert {p.dtype for p in model.parameters()} == {p.grad.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {b.dtype for b in model.buffers()} <= {torch.bfloat16}


@pytest.mark.parametrize("name", ["adamw8bit", "adamw"])
def test_bf16_weights_resume_equals_the_uninterrupted_run(debug_config, tmp_path, name):
    """8 steps straight vs cut at step 4 and resumed: losses, bf16 weights, the 8-bit codes and scales (or fp32
    moments), step counts, RNG (the stochastic rounding's draws continue) and loader state, bit for bit."""
    run = tmp_path / "run"
    settings = {"train.weights": "bf16", "optim.name": name, "train.max_steps": "8", "checkpoint.interval": "4"}
    cfg = debug_config(run, **settings, **{"checkpoint.keep_last": "0", "eval.interval": "0"})
    pretrain(cfg)
    straight = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert straight[-1]["loss"] < straight[0]["loss"]
    weights = {k: v.clone() for k, v in load_pretrained(run).model.state_dict().items()}
    kept = tmp_path / "straight_step_8"
    shutil.copytree(ckpt.checkpoint_path(run, 8), kept)
    saved = checkpoint_contents(kept)["dcp"]
    assert {v.dtype for v in saved["model"].values()} == {torch.bfloat16}  # no fp32 master anywhere
    shutil.rmtree(ckpt.checkpoint_path(run, 8))
    assert pretrain(cfg)["step"] == 8
    resumed = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in resumed] == [
        (r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in straight
    ]
    again = load_pretrained(run).model.state_dict()
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    assert_same_checkpoint(kept, ckpt.checkpoint_path(run, 8))


def test_bf16_weights_on_two_ranks_have_fp32_gradient_norms(debug_config, tmp_path):
    """FSDP2 shards of bf16 gradients: the norm is still computed in fp32 (a bf16 norm would be a bf16 value, and
    clipping and the spike guard would see its rounding), and it is the one process's norm to bf16 precision."""
    settings = {"train.weights": "bf16", "train.max_steps": "3", "train.threads": "1", "eval.interval": "0"}
    pretrain(debug_config(tmp_path / "one", **settings))
    finish(torchrun(debug_config(tmp_path / "two", **settings)))
    one, two = train_rows(tmp_path / "one"), train_rows(tmp_path / "two")
    assert [r[0] for r in two] == [1, 2, 3]
    for (_, _, norm_one, _), (_, _, norm_two, _) in zip(one, two):
        assert float(torch.tensor(norm_two).bfloat16()) != norm_two  # not a bf16 number: computed in fp32
        assert norm_two == pytest.approx(norm_one, rel=2e-2)


REPLICA_DRIVER = """
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from llamita.config import load_config
from llamita.pretrain import pretrain
from llamita.train import checkpoint as ckpt
from llamita.train.torchao_adamw import AdamW

AdamW.most_per_call = 4  # several DTensor shards a compiled update, as on GPUs (a CPU's default is one)
save = ckpt.save_checkpoint


def saving_the_local_weights(path, model, optimizer, trainer_state):
    rank = torch.distributed.get_rank()
    local = {n: (p.to_local() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}
    torch.save(local, Path(path).parents[1] / f"replica{rank}.step{trainer_state['step']}.pt")  # the run folder
    return save(path, model, optimizer, trainer_state)


ckpt.save_checkpoint = saving_the_local_weights
pretrain(load_config(sys.argv[1]))
"""


def test_bf16_weights_stay_identical_on_hsdp_replicas(debug_config, tmp_path):
    """Two HSDP replicas (mesh 2 x 1) of bf16 weights step with stochastic rounding: each draws its random bits
    from its own generator, so they stay one model only if both draw the same. At steps 2 and 4 the weights are
    bit-identical on both ranks, and they moved in between. The optimizer updates several DTensor shards of a shape
    in one compiled call, as it does on GPUs."""
    settings = {"train.weights": "bf16", "train.max_steps": "4", "train.threads": "1", "eval.interval": "0",
                "parallel.dp_replicate": "2", "parallel.fsdp": "on", "checkpoint.interval": "2"}  # fmt: skip
    script = tmp_path / "driver.py"
    script.write_text(REPLICA_DRIVER)
    run = tmp_path / "two"
    finish(torchrun(debug_config(run, **settings), script=script))
    weights = {(rank, step): torch.load(run / f"replica{rank}.step{step}.pt") for rank in (0, 1) for step in (2, 4)}
    names = list(weights[0, 4])
    assert names and all(weights[0, 4][n].dtype == torch.bfloat16 for n in names)
    for step in (2, 4):
        for n in names:
            assert torch.equal(weights[0, step][n], weights[1, step][n]), f"{n} differs between the replicas"
    assert all(not torch.equal(weights[0, 2][n], weights[0, 4][n]) for n in names if "weight" in n and "norm" not in n)
