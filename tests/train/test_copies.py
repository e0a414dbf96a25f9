"""bf16 compute copies of fp32 masters (`train.copies`) and the AdamW that writes them (`optim.CopiesAdamW`)."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from llamita.config import OptimConfig
from llamita.model import get_preset
from llamita.model.llama import Llama
from llamita.pretrain import pretrain
from llamita.train.checkpoint import checkpoint_path
from llamita.train.copies import ComputeCopies
from llamita.train.optim import _adamw_update, _compiled_adamw_update, build_optimizer, clipped_step, gradient_norm
from pretrain_runs import losses

CPU = torch.device("cpu")


def _tiny(tie: bool = True) -> Llama:
    torch.manual_seed(0)
    return Llama(dataclasses.replace(get_preset("debug"), tie_embeddings=tie))


def _losses(run) -> list[float]:
    return [loss for _, loss in losses(run)]


def _adamw_f64(p, g, m, v, step, lr, b1, b2, eps, wd):
    """torch.optim.AdamW's update written out in float64 (the reference)."""
    p = p * (1 - lr * wd)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    p = p - lr / (1 - b1**step) * m / ((v / (1 - b2**step)).sqrt() + eps)
    return p, m, v


@pytest.mark.parametrize("compiled", [False, True])
def test_fused_update_matches_adamw_in_float64(compiled):
    """Five steps with bf16 gradients, clipping factors and one skipped step: master, moments, step count and the
    bf16 copy follow AdamW computed in float64 on the same (clipped) gradients."""
    torch.manual_seed(0)
    n, lr, b1, b2, eps, wd = 1000, 3e-3, 0.9, 0.95, 1e-8, 0.1
    master = torch.randn(n)
    m, v, copy = torch.zeros(n), torch.zeros(n), torch.empty(n, dtype=torch.bfloat16)
    step = torch.zeros(())
    ref_p, ref_m, ref_v, ref_step = master.double(), torch.zeros(n).double(), torch.zeros(n).double(), 0
    update = _compiled_adamw_update() if compiled else _adamw_update  # the compiled one is what CUDA runs
    for skip, coef in [(0.0, 1.0), (0.0, 0.5), (1.0, 0.25), (0.0, 0.8), (0.0, 1.0)]:
        grad = torch.randn(n).to(torch.bfloat16)
        update(
            master, grad, m, v, copy, step, torch.tensor(lr), torch.tensor(skip), torch.tensor(coef), b1, b2, eps, wd
        )
        if not skip:
            ref_step += 1
            g = grad.double() * coef
            ref_p, ref_m, ref_v = _adamw_f64(ref_p, g, ref_m, ref_v, ref_step, lr, b1, b2, eps, wd)
        assert step.item() == ref_step
        torch.testing.assert_close(master.double(), ref_p, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(m.double(), ref_m, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(v.double(), ref_v, rtol=1e-5, atol=1e-9)
        assert torch.equal(copy, master.to(torch.bfloat16))


def test_forward_uses_the_copies_and_state_dict_the_masters():
    model = _tiny(tie=True)
    masters = dict(model.named_parameters())
    copies = ComputeCopies(model, torch.bfloat16)
    seen = {}
    model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda mod, args: seen.update(dtype=mod.weight.dtype)
    )
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    loss = model(ids, targets=ids)
    assert seen["dtype"] == torch.bfloat16 and loss.dtype == torch.float32
    # Outside forward the model holds its fp32 masters again, under their own names.
    assert all(p is masters[name] for name, p in model.named_parameters())
    assert all(t.dtype == torch.float32 for t in model.state_dict().values())
    loss.backward()
    # Gradients land on the copies, in bf16; the tied embedding / lm_head has one copy and one gradient.
    embed = model.model.embed_tokens.weight
    assert embed is model.lm_head.weight
    assert embed.grad is None and copies.grad_of(embed).dtype == torch.bfloat16
    assert all(copies.grad_of(p) is not None for p in model.parameters())


def test_a_changed_master_is_copied_again_before_the_next_forward():
    model = _tiny()
    copies = ComputeCopies(model, torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    model(ids)
    weight = model.model.norm.weight
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["model.norm.weight"].fill_(3.0)
    model.load_state_dict(state)
    model(ids)  # refreshes what changed
    assert torch.equal(copies.copy_of(weight), torch.full_like(weight, 3.0, dtype=torch.bfloat16))
    with torch.no_grad():
        weight.mul_(2.0)
    copies.refresh()
    assert torch.equal(copies.copy_of(weight), torch.full_like(weight, 6.0, dtype=torch.bfloat16))


def test_micro_batch_gradients_are_summed_in_fp32():
    model = _tiny()
    copies = ComputeCopies(model, torch.bfloat16)
    ids = [torch.randint(0, model.config.vocab_size, (2, 16)) for _ in range(3)]
    singles = []
    for x in ids:  # each micro-batch's bf16 gradient alone
        model(x, targets=x).backward()
        singles.append(copies.grad_of(model.model.norm.weight).clone())
        copies.zero_grad()
    copies.accumulate_fp32 = True
    for x in ids:
        model(x, targets=x).backward()
    summed = copies.grad_of(model.model.norm.weight)
    assert summed.dtype == torch.float32 and copies.copy_of(model.model.norm.weight).grad is None
    torch.testing.assert_close(summed, sum(s.float() for s in singles), rtol=0, atol=0)


def test_clipped_step_equals_clip_then_adamw():
    """CopiesAdamW with the clipping factor folded in takes the step of clip_grad_norm_ + torch's AdamW on fp32
    gradients equal to the bf16 ones; a skipped step leaves every master and copy as it was."""
    model, reference = _tiny(), _tiny()
    copies = ComputeCopies(model, torch.bfloat16)
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1)
    opt = build_optimizer(model, cfg, CPU, copies)
    ref_opt = torch.optim.AdamW(
        [{"params": [p for p in reference.parameters() if p.ndim >= 2], "weight_decay": 0.1},
         {"params": [p for p in reference.parameters() if p.ndim < 2], "weight_decay": 0.0}],
        lr=1e-2, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, foreach=False,
    )  # fmt: skip
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    for skip in (0.0, 1.0, 0.0):
        model(ids, targets=ids).backward()
        for p, r in zip(model.parameters(), reference.parameters()):
            r.grad = copies.grad_of(p).float()
        norm = gradient_norm(opt)
        expected = torch.nn.utils.clip_grad_norm_(list(reference.parameters()), 0.05)
        torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)
        before = [p.detach().clone() for p in model.parameters()]
        clipped_step(opt, norm, 0.05, torch.tensor(skip))
        if skip:
            assert all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
        else:
            ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        for p, r in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)
            assert torch.equal(copies.copy_of(p), p.detach().to(torch.bfloat16))
    assert opt.state_dict()["state"][0]["step"].item() == 2  # the skipped step is not counted


def test_pretrain_with_copies_matches_fsdp2_casts_and_resumes_exactly(debug_config, tmp_path):
    """bf16 through compute copies trains like FSDP2's bf16 casts (same bf16 math, fp32 updates), and a run cut
    at step 4 and resumed continues exactly; its checkpoint also resumes under FSDP2."""
    common = {"train.dtype": "bf16", "train.max_steps": "8", "checkpoint.interval": "4", "eval.interval": "0"}
    fsdp, copies, cut = tmp_path / "fsdp", tmp_path / "copies", tmp_path / "cut"
    pretrain(debug_config(fsdp, **common, **{"parallel.fsdp": "on"}))
    pretrain(debug_config(copies, **common, **{"parallel.copies": "on"}))
    assert _losses(copies) == pytest.approx(_losses(fsdp), rel=2e-3)
    pretrain(debug_config(cut, **common, **{"parallel.copies": "on"}))
    shutil.rmtree(checkpoint_path(cut, 8))  # as if the run had stopped after step 4
    pretrain(debug_config(cut, **common, **{"parallel.copies": "on"}))
    assert _losses(cut) == _losses(copies)
    step4 = checkpoint_path(cut, 4)
    pretrain(debug_config(tmp_path / "other", **common, **{"parallel.fsdp": "on", "checkpoint.resume": str(step4)}))
    assert _losses(tmp_path / "other") == pytest.approx(_losses(copies)[4:], rel=2e-3)
