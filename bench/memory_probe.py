"""Where the GPU memory of a llamita training step goes, phase by phase: the measurements behind `llamita plan memory`.

Each named setup (SPECS) runs 5 steps of forward, backward and the optimizer of the real model, parallelisms and
optimizer (no data loader) in its own process and records `torch.cuda.memory_allocated` / `max_memory_allocated`
after the embedding, before and after the final norm, after forward, backward and the step, and the reserved and
driver-used memory; `ctx` measures the CUDA context alone. src/llamita/plan/memory.py's terms are checked against
these (tests/plan/test_memory.py holds the peaks as constants, with the bench/results JSONs).

    PYTHONPATH=src TAG=par PAR=3 OUT=out python3 bench/memory_probe.py copies-b8,fp8-copies-b8,...,ctx
"""

import json
import os
import subprocess
import sys
import time

SPECS = {
    "copies-b8": dict(batch=8, fp8=False, fsdp=False, copies=True, ac="none"),
    "copies-b4": dict(batch=4, fp8=False, fsdp=False, copies=True, ac="none"),
    "copies-b2": dict(batch=2, fp8=False, fsdp=False, copies=True, ac="none"),
    "fp8-copies-b8": dict(batch=8, fp8=True, fsdp=False, copies=True, ac="none"),
    "fp8-copies-b4": dict(batch=4, fp8=True, fsdp=False, copies=True, ac="none"),
    "fsdp-reshard-b8": dict(batch=8, fp8=False, fsdp=True, copies=False, ac="none"),
    "fsdp-sel-b8": dict(batch=8, fp8=False, fsdp=True, copies=False, ac="selective"),
    "fsdp-full-b8": dict(batch=8, fp8=False, fsdp=True, copies=False, ac="full"),
    "fp8-fsdp-sel-b8": dict(batch=8, fp8=True, fsdp=True, copies=False, ac="selective"),
    "copies-eager-b8": dict(batch=8, fp8=False, fsdp=False, copies=True, ac="none", compile=False),
    "copies-b8-s1024": dict(batch=8, fp8=False, fsdp=False, copies=True, ac="none", seq=1024),
    "copies-b16": dict(batch=16, fp8=False, fsdp=False, copies=True, ac="none"),
    "t120m-copies-b8": dict(batch=8, fp8=False, fsdp=False, copies=True, ac="none", preset="tinyllama-120m"),
    "t120m-eager-b8": dict(
        batch=8, fp8=False, fsdp=False, copies=True, ac="none", preset="tinyllama-120m", compile=False
    ),
    "fp8-fsdp-full-b8": dict(batch=8, fp8=True, fsdp=True, copies=False, ac="full"),
    "fsdp-noreshard-sel-b8": dict(batch=8, fp8=False, fsdp=True, copies=False, ac="selective", reshard=False),
}
GIB = 2**30


def worker(name: str) -> dict:
    import torch

    from llamita.config import OptimConfig, ParallelConfig
    from llamita.model.config import get_preset
    from llamita.pretrain import build_model
    from llamita.train.copies import ComputeCopies
    from llamita.train.optim import build_optimizer, clipped_step, gradient_norm
    from llamita.train.parallel import build_mesh, parallelize

    spec = SPECS[name]
    seq = spec.get("seq", 2048)
    device = torch.device("cuda")
    torch.manual_seed(0)
    config = get_preset(spec.get("preset", "tinyllama-1.1b"))
    model = build_model(config, device, 0)
    par = ParallelConfig(
        fsdp="on" if spec["fsdp"] else "off",
        reshard_after_forward=spec.get("reshard", True),
        compile=spec.get("compile", True),
        float8=spec["fp8"],
        activation_checkpoint=spec["ac"],
    )
    mesh = build_mesh(1, 1, "cuda") if spec["fsdp"] else None
    parallelize(model, par, mesh, device, param_dtype=torch.bfloat16)
    copies = ComputeCopies(model, torch.bfloat16) if spec["copies"] else None
    opt = build_optimizer(model, OptimConfig(lr=4e-4, weight_decay=0.1, beta1=0.9, beta2=0.95), device, copies)
    no_skip = torch.zeros((), device=device)
    g = torch.Generator().manual_seed(1)
    tok = torch.randint(0, config.vocab_size, (spec["batch"], seq + 1), generator=g).to(device)
    x, y = tok[:, :-1].contiguous(), tok[:, 1:].contiguous()
    marks: dict = {}

    def mark(key):
        def hook(*args):
            torch.cuda.synchronize()
            marks[key] = torch.cuda.memory_allocated()
            marks[key + "_peak"] = torch.cuda.max_memory_allocated()

        return hook

    model.model.embed_tokens.register_forward_hook(mark("after_embed"))
    model.model.norm.register_forward_pre_hook(mark("before_norm"))
    model.model.norm.register_forward_hook(mark("after_norm"))
    rows = []
    for _ in range(5):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        r = {"static": torch.cuda.memory_allocated()}
        loss = model(x, targets=y)
        torch.cuda.synchronize()
        r["after_fwd"] = torch.cuda.memory_allocated()
        r["fwd_peak"] = torch.cuda.max_memory_allocated()
        r.update(marks)
        torch.cuda.reset_peak_memory_stats()
        loss.backward()
        torch.cuda.synchronize()
        r["after_bwd"] = torch.cuda.memory_allocated()
        r["bwd_peak"] = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        clipped_step(opt, gradient_norm(opt), 1.0, no_skip)
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        r["after_step"] = torch.cuda.memory_allocated()
        r["step_peak"] = torch.cuda.max_memory_allocated()
        r["reserved"] = torch.cuda.max_memory_reserved()
        r["loss"] = float(loss)
        rows.append({k: (v / GIB if isinstance(v, int) else v) for k, v in r.items()})
    free, total = torch.cuda.mem_get_info()
    out = {
        "name": name,
        "spec": spec,
        "rows": rows[-2:],
        "driver_used_gib": (total - free) / GIB,
        "reserved_now_gib": torch.cuda.memory_reserved() / GIB,
        "n_params": sum(p.numel() for p in model.parameters()),
    }
    return out


def context_probe() -> dict:
    import torch

    torch.zeros(1, device="cuda")
    free, total = torch.cuda.mem_get_info()
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    (a @ a).sum().item()
    free2, _ = torch.cuda.mem_get_info()
    return {
        "ctx_only_gib": (total - free) / GIB,
        "ctx_after_cublas_gib": (total - free2) / GIB,
        "reserved_gib": torch.cuda.memory_reserved() / GIB,
        "total_gib": total / GIB,
    }


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        name = sys.argv[2]
        res = context_probe() if name == "ctx" else worker(name)
        print("RESULT " + json.dumps(res), flush=True)
        return
    out_dir = os.environ.get("OUT", "/tmp")
    names = sys.argv[1].split(",")
    procs = {}
    results = {}
    parallel = int(os.environ.get("PAR", "3"))
    pending = list(names)
    t0 = time.time()
    while pending or procs:
        while pending and len(procs) < parallel:
            n = pending.pop(0)
            log = open(f"/tmp/{n}.log", "w")
            procs[n] = (
                subprocess.Popen(
                    [sys.executable, __file__, "--worker", n], stdout=subprocess.PIPE, stderr=log, text=True
                ),
                log,
            )
        for n, (p, log) in list(procs.items()):
            if p.poll() is not None:
                text = p.stdout.read()
                line = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
                results[n] = json.loads(line[0][7:]) if line else {"error": p.returncode}
                print(n, round(time.time() - t0), json.dumps(results[n])[:3000], flush=True)
                del procs[n]
                log.close()
        time.sleep(1)
    with open(f"{out_dir}/probe-{os.environ.get('TAG', 'x')}.json", "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
