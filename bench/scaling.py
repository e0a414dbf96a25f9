"""Multi-GPU scaling of `llamita pretrain` (FSDP2, HSDP replication) against litgpt's FSDP (see bench/README.md).

Every llamita run is the real `llamita pretrain`, launched by torchrun as a user launches it, on bench/scaling.yaml:
tinyllama-1.1b, sequence 2048, bf16, per-block compile, chunked loss, on the prepared demo corpus (`--data`).

* Throughput: tokens/s per GPU on 1, 2, 4 and 8 GPUs (as many as there are, or `--gpus`) at 16384 tokens per GPU
  per step (micro-batch 8, no accumulation: the global batch grows with the GPUs) for each layout:
  `fsdp2-reshard-false` (the recipe's), `fsdp2-reshard-true` (`parallel.reshard_after_forward true`), `replicate`
  (`parallel.dp_replicate` = GPUs: HSDP with shard groups of one GPU, every GPU holds the whole model, the
  data-parallel layout; on one GPU it is the `fsdp2-reshard-false` run) and `litgpt-fsdp`. Tokens/s come from
  the run's metrics.jsonl, as the harmonic mean of the log intervals after the first `skip` steps (compile); the
  efficiency is tokens/s per GPU over that of the same layout on one GPU (the issue's goal: >= 95% on 8 GPUs).
* `litgpt-fsdp`, the peer: litgpt's GPT (`tiny-llama-1.1b`, llamita's initial weights) set up as litgpt's pretrain
  sets it up: Lightning Fabric, `FSDPStrategy(auto_wrap_policy={Block}, sharding_strategy="HYBRID_SHARD")` on
  several GPUs and the single-device strategy on one, `bf16-mixed`, `torch.compile` on the whole model, fused
  AdamW, clipping, cross-entropy on the full logits. It trains on random tokens resident on the GPU (litgpt's data
  pipeline is not llamita's), and runs only where litgpt and lightning import; otherwise the table says why.
* `--loss-curve`: `--curve-steps` (200) steps on the most GPUs and on one GPU with the same global batch
  (8 sequences; both use micro-batches of 8 / N sequences, so the one-GPU run accumulates N of them); the per-step
  losses are compared (largest and mean relative gap).
* `--resume-check`: those two runs also save a sharded checkpoint halfway; each run is cut back to it and resumed
  on the other number of GPUs, and the resumed losses are compared with both uninterrupted runs.

Every process started gets NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NVSHMEM_DISABLE_NVLS=1
(NVLink multicast off). The trainer always validates and saves a checkpoint when it reaches `max_steps` (13 GB for
this model; no setting skips it), so each run is stopped once its last metrics row is written and its folder is
deleted. Runs go in order of importance (llamita's layouts on 1 GPU, then on the most GPUs down, then the peer
the same way) and share one `--deadline`: a run that would no longer fit is skipped and the table says so.

    python bench/scaling.py                              # every layout on 1, 2, 4, 8 GPUs (as many as there are)
    python bench/scaling.py --gpus 1,2 --loss-curve --resume-check
    python bench/scaling.py --smoke --data .benchdata    # CPU, gloo, the debug preset: the script end to end
    python bench/scaling.py --tables out/scaling.json    # the tables again, from the JSON

The tables are printed last; every number goes to `--out`/scaling.json and every run's output to `--out`/runs.log.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "bench" / "scaling.yaml"
NVLS_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
GOAL = 0.95  # tokens/s per GPU on 8 GPUs over one GPU's
SEED = 3407
LR = 4e-4

LAYOUTS = {
    "fsdp2-reshard-false": "FSDP2 per block, gathered weights kept from forward to backward (the recipe's)",
    "fsdp2-reshard-true": "FSDP2 per block, weights freed after forward and gathered again for backward",
    "replicate": "HSDP with shard groups of one GPU (parallel.dp_replicate = GPUs): the whole model on every GPU, "
    "gradients all-reduced; on one GPU the fsdp2-reshard-false run",
    "litgpt-fsdp": "litgpt's GPT as litgpt's pretrain sets it up: Lightning Fabric, FSDPStrategy (FSDP1, "
    "HYBRID_SHARD, Block wrap, bf16 gradient reduction) on several GPUs, one device on one, bf16-mixed, "
    "torch.compile on the whole model; random tokens",
}


@dataclasses.dataclass(frozen=True)
class Mode:
    """Sizes of one way to run the script: on GPUs, or the smoke check on CPU."""

    device: str
    steps: int
    """Steps of a throughput run."""
    skip: int
    """Steps left out of its tokens/s (compile, first steps); a multiple of `log_interval`."""
    log_interval: int
    curve_batch: int
    """Sequences per step of the loss-curve and resume runs (same on every number of GPUs)."""
    curve_steps: int
    min_run_s: float
    """A run is not started with less time left than this."""
    overrides: dict[str, str]
    """Added to the recipe for every run."""


GPU = Mode("cuda", steps=40, skip=10, log_interval=5, curve_batch=8, curve_steps=200, min_run_s=60.0, overrides={})
SMOKE = Mode(
    "cpu",
    steps=6,
    skip=2,
    log_interval=2,
    curve_batch=4,
    curve_steps=8,
    min_run_s=5.0,
    overrides={
        "model.preset": "debug",
        "data.seq_len": "64",
        "train.micro_batch": "2",
        "train.device": "cpu",
        "train.dtype": "auto",
        "train.threads": "1",
        "optim.warmup_steps": "2",
        "parallel.fsdp": "on",  # as on a GPU, where `auto` turns FSDP2 on for one process too
        "parallel.compile": "false",
        "eval.batches": "2",
        "eval.batch_size": "2",
    },
)


# ------------------------------------------------------------------------------------------------ processes
def _descendants(pid: int) -> list[int]:
    """Every process below `pid`: torchrun starts its workers in sessions of their own, so no group holds them."""
    parent_of: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parent_of[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    found, frontier = [], {pid}
    while frontier:
        frontier = {p for p, parent in parent_of.items() if parent in frontier}
        found += sorted(frontier)
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and everything below it; return once they are gone (their GPU memory is free)."""
    pids = _descendants(proc.pid)
    for pid in [*pids, proc.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    t0 = time.monotonic()
    while any(_alive(p) for p in pids) and time.monotonic() - t0 < 30:
        time.sleep(0.2)


def _multicast_off(pid: int) -> bool | None:
    """Whether process `pid` started with NVLink multicast off in its environment (None: it is gone)."""
    try:
        items = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    env = dict(item.decode(errors="replace").split("=", 1) for item in items if b"=" in item)
    return all(env.get(k) == v for k, v in NVLS_OFF.items())


def _launch(name: str, cmd: list[str], env: dict, log: Path, timeout: float, done: Callable[[], bool]) -> dict:
    """Run `cmd` (output appended to `log`) until it exits, `done()` turns true, or `timeout` seconds pass.

    While it runs, every process of its tree (torchrun, the workers, compile workers) is checked for the
    NVLink-multicast variables in its environment.

    Returns:
        {"status", "wall_s", "multicast_off": {"processes": checked, "all": bool}}, and "output": what it wrote.
    """
    start = log.stat().st_size if log.exists() else 0
    t0 = time.monotonic()
    status = ""
    checked: dict[int, bool] = {}
    with log.open("a") as out:
        out.write(f"\n===== {name}: {shlex.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            while proc.poll() is None:
                for pid in [proc.pid, *_descendants(proc.pid)]:
                    if pid not in checked and (ok := _multicast_off(pid)) is not None:
                        checked[pid] = ok
                if done():
                    status = "stopped after its last step"
                    break
                if time.monotonic() - t0 > timeout:
                    status = f"timeout after {timeout:.0f} s"
                    break
                time.sleep(0.5)
        finally:
            if proc.poll() is None:
                _kill_tree(proc)
    if not status:
        status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
    with log.open("rb") as f:
        f.seek(start)
        output = f.read().decode(errors="replace")
    multicast = {"processes": len(checked), "all": all(checked.values())}
    return {"status": status, "wall_s": time.monotonic() - t0, "multicast_off": multicast, "output": output}


def _tail(output: str, n: int = 12) -> list[str]:
    return [line[:300] for line in output.strip().splitlines()[-n:]]


# ------------------------------------------------------------------------------------------------ the bench
@dataclasses.dataclass
class Bench:
    """What every run of one call shares: sizes, folders, the deadline, the data and the GPUs."""

    mode: Mode
    out: Path
    work: Path
    deadline: float
    """time.monotonic() by which the last run must end."""
    timeout: float
    data: dict[str, str]
    """Overrides naming the tokenizer and the prepared sources."""
    visible: list[str]
    """CUDA device ids a run may take, the first N for an N-GPU run (empty on CPU)."""
    preset: str
    seq_len: int
    micro_batch: int
    vocab_size: int
    runs: dict[str, dict] = dataclasses.field(default_factory=dict)

    @property
    def log(self) -> Path:
        return self.out / "runs.log"

    def env(self, nproc: int) -> dict[str, str]:
        """The environment of a launched run: multicast off, unbuffered output, llamita from this checkout."""
        path = [str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]
        env = {**os.environ, **NVLS_OFF, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(p for p in path if p)}
        if self.visible:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.visible[:nproc])
        return env

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def torchrun(self, nproc: int) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]

    def out_of_time(self, name: str, nproc: int) -> dict | None:
        """The record of a run that no longer fits in the call, or None when it may start."""
        left = self.time_left()
        if left >= self.mode.min_run_s:
            return None
        record = {"gpus": nproc, "status": f"skipped: {max(left, 0):.0f} s left of --deadline", "wall_s": 0.0}
        self.runs[name] = record
        print(f"[{name}] {record['status']}", flush=True)
        return record

    def pretrain(self, name: str, nproc: int, overrides: dict[str, str], run_dir: Path, last_step: int) -> dict:
        """`llamita pretrain` on `nproc` processes, stopped once metrics.jsonl has the row of `last_step`."""
        skipped = self.out_of_time(name, nproc)
        if skipped is not None:
            return skipped
        settings = {**self.data, **self.mode.overrides, **overrides}
        cmd = [*self.torchrun(nproc), "-m", "llamita.cli", "pretrain", "--config", str(RECIPE)]
        cmd += ["--out_dir", str(run_dir)]
        for key, value in settings.items():
            cmd += [f"--{key}", value]
        metrics = run_dir / "metrics.jsonl"
        record = _launch(
            name,
            cmd,
            self.env(nproc),
            self.log,
            min(self.timeout, self.time_left()),
            lambda: max((r["step"] for r in train_rows(metrics)), default=0) >= last_step,
        )
        output = record.pop("output")
        rows = train_rows(metrics)
        record.update(gpus=nproc, overrides=overrides)
        record["rows"] = rows
        resumed = re.search(r"resumed from (\S+) at step (\d+)", output)
        if resumed:
            record["resumed_at_step"] = int(resumed.group(2))
        reached = max((r["step"] for r in rows), default=0)
        if reached < last_step:
            record["error"] = f"{record['status']}; reached step {reached} of {last_step}"
            record["log_tail"] = _tail(output)
        self.runs[name] = record
        self._print(name, record)
        return record

    def litgpt(self, name: str, nproc: int) -> dict:
        """litgpt's FSDP peer on `nproc` processes (`litgpt_worker`); rank 0 writes its numbers as JSON."""
        skipped = self.out_of_time(name, nproc)
        if skipped is not None:
            return skipped
        spec = {
            "device": self.mode.device,
            "preset": self.preset,
            "vocab_size": self.vocab_size,
            "seq_len": self.seq_len,
            "micro_batch": self.micro_batch,
            "warmup": self.mode.skip,
            "steps": self.mode.steps - self.mode.skip,
            "compile": self.mode.device == "cuda",
        }
        result = self.work / f"{name.replace(' ', '-')}.json"
        cmd = [*self.torchrun(nproc), str(Path(__file__).resolve()), "--litgpt-worker", json.dumps(spec)]
        cmd += ["--result", str(result)]
        record = _launch(name, cmd, self.env(nproc), self.log, min(self.timeout, self.time_left()), lambda: False)
        output = record.pop("output")
        record.update(gpus=nproc, spec=spec)
        if record["status"] == "ok" and result.is_file():
            record.update(json.loads(result.read_text()))
        else:
            record["error"] = record["status"]
            record["log_tail"] = _tail(output)
        self.runs[name] = record
        self._print(name, record)
        return record

    def save(self, results: dict) -> None:
        """Write the results so far (with every run's record) to scaling.json."""
        results["runs"] = self.runs
        (self.out / "scaling.json").write_text(json.dumps(results, indent=1))

    @staticmethod
    def _print(name: str, record: dict) -> None:
        if "error" in record:
            print(f"[{name}] FAILED ({record['error']}): {' | '.join(record.get('log_tail', [])[-3:])}", flush=True)
        else:
            print(f"[{name}] {record['status']} ({record['wall_s']:.0f} s)", flush=True)


def train_rows(metrics: Path) -> list[dict]:
    """The training rows of a metrics.jsonl written so far (a line still being written is left out)."""
    if not metrics.is_file():
        return []
    rows = []
    for line in metrics.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            row = json.loads(line)
            if "loss" in row and "step" in row:
                rows.append(row)
    return rows


def drop_checkpoints(run_dir: Path, keep_step: int | None = None) -> None:
    """Delete a run's checkpoints (13 GB each for tinyllama-1.1b), interrupted saves too, but the one of `keep_step`."""
    from llamita.train.checkpoint import checkpoint_path

    keep = checkpoint_path(run_dir, keep_step).name if keep_step is not None else None
    root = run_dir / "checkpoints"
    if root.is_dir():
        for path in root.iterdir():
            if path.name != keep:
                shutil.rmtree(path, ignore_errors=True)


def cut_back(run_dir: Path, step: int) -> None:
    """Leave a run as if it had stopped after its checkpoint at `step`: that checkpoint, metrics up to it."""
    drop_checkpoints(run_dir, keep_step=step)
    metrics = run_dir / "metrics.jsonl"
    kept = []
    for line in metrics.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a row cut off when the run was stopped
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
    metrics.write_text("".join(line + "\n" for line in kept))


# ------------------------------------------------------------------------------------------------ numbers
def throughput(rows: list[dict], gpus: int, skip: int, interval: int) -> dict:
    """Tokens/s of a run from its metrics rows: the log intervals that start at or after step `skip`.

    Every row of one log interval carries that interval's rate, and the intervals hold equal token counts, so
    their harmonic mean is total tokens over total time.
    """
    timed = [r for r in rows if r["step"] % interval == 0 and r["step"] - interval >= skip]
    if not timed:
        return {"error": f"no log interval after step {skip}"}
    rates = [r["tokens_per_s"] for r in timed]
    total = len(rates) / sum(1 / x for x in rates)
    return {
        "tokens_per_s": total,
        "tokens_per_s_per_gpu": total / gpus,
        "interval_rates": rates,
        "timed_steps": [timed[0]["step"] - interval + 1, timed[-1]["step"]],
        "mfu": total * timed[0]["mfu"] / timed[0]["tokens_per_s"] if "mfu" in timed[0] else None,
        "peak_gib": max((r["max_memory_gib"] for r in rows if "max_memory_gib" in r), default=None),
    }


def add_efficiency(entries: list[dict]) -> None:
    """Efficiency of each measured entry: tokens/s per GPU over that of the same layout on one GPU."""
    base = {e["layout"]: e["tokens_per_s_per_gpu"] for e in entries if e["gpus"] == 1 and "tokens_per_s_per_gpu" in e}
    for e in entries:
        if "tokens_per_s_per_gpu" in e and e["layout"] in base:
            e["efficiency"] = e["tokens_per_s_per_gpu"] / base[e["layout"]]


def compare_losses(a: list[dict], b: list[dict], after: int = 0) -> dict:
    """Per-step relative gap |a - b| / |b| of two runs' losses over the steps after `after` that both logged."""
    la = {r["step"]: r["loss"] for r in a if r["step"] > after}
    lb = {r["step"]: r["loss"] for r in b if r["step"] > after}
    steps = sorted(la.keys() & lb.keys())
    if not steps:
        return {"error": "no common steps"}
    gaps = [abs(la[s] - lb[s]) / abs(lb[s]) for s in steps]
    worst = max(range(len(steps)), key=gaps.__getitem__)
    return {
        "steps": [steps[0], steps[-1]],
        "max_rel_gap": gaps[worst],
        "max_at_step": steps[worst],
        "mean_rel_gap": statistics.fmean(gaps),
    }


# ------------------------------------------------------------------------------------------------ the parts
def run_order(gpus: list[int], layouts: list[str]) -> list[tuple[int, str]]:
    """(GPUs, layout) in order of importance, so that a deadline cuts the least needed runs.

    llamita before the peer; one GPU first (every efficiency needs it), then the most GPUs down.
    """
    counts = sorted(gpus, key=lambda n: (n != 1, -n))
    return [(n, x) for peer in (False, True) for n in counts for x in layouts if (x == "litgpt-fsdp") == peer]


def run_throughput(bench: Bench, gpus: list[int], layouts: list[str], results: dict) -> None:
    """Every (GPUs, layout) run in `run_order`, each an entry of results["throughput"], then the efficiencies."""
    entries: list[dict] = results["throughput"]
    missing = litgpt_missing() if "litgpt-fsdp" in layouts else None
    if missing:
        entries.append({"layout": "litgpt-fsdp", "gpus": None, "error": f"not run: {missing}"})
        layouts = [x for x in layouts if x != "litgpt-fsdp"]
    for n, layout in run_order(gpus, layouts):
        name = f"{layout} {n} GPU"
        entry: dict[str, Any] = {"layout": layout, "gpus": n, "run": name}
        if layout == "replicate" and n == 1 and "fsdp2-reshard-false" in layouts:
            same = next(e for e in entries if e["layout"] == "fsdp2-reshard-false" and e["gpus"] == 1)
            entries.append({**same, "layout": layout, "same_as": same["run"]})
            continue
        if layout == "litgpt-fsdp" and n > 1 and bench.mode.device != "cuda":
            entries.append({**entry, "error": "not run on CPU: Lightning Fabric's FSDPStrategy needs CUDA"})
            continue
        if layout == "litgpt-fsdp":
            record = bench.litgpt(name, n)
            entry.update({k: record[k] for k in ("tokens_per_s", "mfu", "peak_gib") if k in record})
            if "tokens_per_s" in record:
                entry["tokens_per_s_per_gpu"] = record["tokens_per_s"] / n
        else:
            overrides = {
                "train.global_batch_tokens": str(bench.seq_len * bench.micro_batch * n),
                "train.max_steps": str(bench.mode.steps),
                "log.interval": str(bench.mode.log_interval),
                "parallel.reshard_after_forward": "true" if layout == "fsdp2-reshard-true" else "false",
            }
            if layout == "replicate":
                overrides["parallel.dp_replicate"] = str(n)
            run_dir = bench.work / name.replace(" ", "-")
            record = bench.pretrain(name, n, overrides, run_dir, bench.mode.steps)
            shutil.rmtree(run_dir, ignore_errors=True)
            if "rows" in record and "error" not in record:
                entry.update(throughput(record["rows"], n, bench.mode.skip, bench.mode.log_interval))
        entry["global_batch_tokens"] = bench.seq_len * bench.micro_batch * n
        if "error" in record or record["status"].startswith("skipped"):
            entry["error"] = record.get("error", record["status"])
        entries.append(entry)
        bench.save(results)
    add_efficiency(entries)


def run_curve_and_resume(bench: Bench, n: int, steps: int, resume: bool, results: dict) -> None:
    """The loss curves of `n` GPUs and of one GPU on the same global batch; with `resume`, each resumed on the other.

    Both runs use micro-batches of curve_batch / n sequences, so each rank of the n-GPU run and each accumulation
    step of the one-GPU run see batches of the same shape, and the checkpoint and data order move between them.
    """
    batch = bench.mode.curve_batch
    if n < 2 or batch % n:
        results["curve"] = {"error": f"needs 2 or more GPUs dividing {batch} sequences, not {n}"}
        return
    half = steps // 2
    overrides = {
        "train.global_batch_tokens": str(batch * bench.seq_len),
        "train.micro_batch": str(batch // n),
        "train.max_steps": str(steps),
        "log.interval": str(bench.mode.log_interval),
        "checkpoint.interval": str(half if resume else 0),
        "checkpoint.keep_last": "0",
    }
    dirs = {g: bench.work / f"curve-{g}gpu" for g in (n, 1)}
    runs = {}
    for g in (n, 1):
        runs[g] = bench.pretrain(f"curve {g} GPU", g, overrides, dirs[g], steps)
        drop_checkpoints(dirs[g], keep_step=half if resume else None)
    curve: dict[str, Any] = {"gpus": n, "batch_sequences": batch, "steps": steps}
    failed = {g: r.get("error", r["status"]) for g, r in runs.items() if "error" in r or "rows" not in r}
    if failed:
        curve["error"] = "; ".join(f"{g} GPU: {message}" for g, message in failed.items())
    else:
        curve.update(compare_losses(runs[n]["rows"], runs[1]["rows"]))
        curve["losses"] = {str(g): [r["loss"] for r in runs[g]["rows"]] for g in (n, 1)}
    results["curve"] = curve
    bench.save(results)
    if not resume:
        return
    checks = []
    for saved, resumed_on in ((n, 1), (1, n)):
        check: dict[str, Any] = {"saved_on": saved, "resumed_on": resumed_on, "step": half}
        if "error" in curve:
            check["error"] = "not run: the uninterrupted runs did not finish"
        else:
            cut_back(dirs[saved], half)
            record = bench.pretrain(f"resume {saved}->{resumed_on} GPU", resumed_on, overrides, dirs[saved], steps)
            check["resumed_at_step"] = record.get("resumed_at_step")
            if "error" in record or record["status"].startswith("skipped"):
                check["error"] = record.get("error", record["status"])
            elif record.get("resumed_at_step") != half:
                check["error"] = f"the run did not resume from step {half} (see runs.log)"
            else:
                check["vs_saving_count"] = compare_losses(record["rows"], runs[saved]["rows"], after=half)
                check["vs_resuming_count"] = compare_losses(record["rows"], runs[resumed_on]["rows"], after=half)
        drop_checkpoints(dirs[saved])
        checks.append(check)
    results["resume"] = checks
    for d in dirs.values():
        shutil.rmtree(d, ignore_errors=True)


def litgpt_missing() -> str | None:
    """Why the litgpt peer cannot run here, or None when litgpt's model and Lightning Fabric import."""
    try:
        import lightning.fabric  # noqa: F401
        from train_throughput import import_litgpt

        import_litgpt()
    except Exception as e:  # any import failure means the peer cannot run; the message says which
        return f"litgpt or lightning does not import ({type(e).__name__}: {e}); bench/README.md says how to carry them"
    return None


def litgpt_worker(spec: dict, result: Path) -> None:
    """One litgpt run inside torchrun: build, set up as litgpt's pretrain does, train, time; rank 0 writes JSON."""
    import importlib.metadata as md

    import torch
    import torch.nn.functional as F
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import FSDPStrategy
    from train_throughput import build_litgpt_model, import_litgpt, model_config

    from llamita.train.metrics import peak_flops

    cuda = spec["device"] == "cuda"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    strategy: Any = "auto"  # litgpt's pretrain on one device
    if world > 1:
        # litgpt's pretrain strategy. HYBRID_SHARD sizes its node groups by torch.cuda.device_count(), hence the
        # launcher's CUDA_VISIBLE_DEVICES of exactly the run's GPUs.
        strategy = FSDPStrategy(
            auto_wrap_policy={import_litgpt()[1].Block}, state_dict_type="full", sharding_strategy="HYBRID_SHARD"
        )
    precision = "bf16-mixed" if cuda else "32-true"
    fabric = Fabric(accelerator="cuda" if cuda else "cpu", devices=world, strategy=strategy, precision=precision)
    fabric.launch()
    fabric.seed_everything(SEED)
    config = model_config(spec)
    model = build_litgpt_model(config, spec["preset"], fabric.device)
    if spec["compile"]:
        model = torch.compile(model)
    model = fabric.setup(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, betas=(0.9, 0.95), fused=cuda)
    optimizer = fabric.setup_optimizers(optimizer)
    g = torch.Generator().manual_seed(SEED + fabric.global_rank)  # each rank its own batches
    batches = torch.randint(0, config.vocab_size, (4, spec["micro_batch"], spec["seq_len"] + 1), generator=g)
    batches = batches.to(fabric.device)

    def step(i: int) -> torch.Tensor:
        batch = batches[i % len(batches)]
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        fabric.backward(loss)
        fabric.clip_gradients(model, optimizer, max_norm=1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for i in range(spec["warmup"]):
        step(i)
    sync()
    t0 = time.perf_counter()
    losses = [step(spec["warmup"] + i) for i in range(spec["steps"])]
    sync()
    seconds = time.perf_counter() - t0
    tokens_per_s = spec["steps"] * spec["micro_batch"] * spec["seq_len"] * world / seconds
    peak = peak_flops(fabric.device)
    if fabric.global_rank == 0:
        out = {
            "tokens_per_s": tokens_per_s,
            "step_ms": 1e3 * seconds / spec["steps"],
            "mfu": tokens_per_s / world * config.flops_per_token(spec["seq_len"]) / peak if peak else None,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
            "loss_last": float(losses[-1]),
            "versions": {name: md.version(name) for name in ("torch", "lightning", "litgpt")},
        }
        result.write_text(json.dumps(out))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ------------------------------------------------------------------------------------------------ tables
def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def tables(results: dict) -> str:
    meta = results.get("meta", {})
    lines = [
        f"## Multi-GPU scaling: {meta.get('device', '?')}, {meta.get('preset', '?')}, seq {meta.get('seq_len', '?')}, "
        f"{meta.get('tokens_per_gpu', '?')} tokens per GPU per step",
        "",
        f"{meta.get('date', '')}, commit {meta.get('commit', '?')}, torch {meta.get('torch', '?')}: "
        f"`{meta.get('command', '')}`",
        "",
        "| layout | GPUs | global batch | tokens/s | tokens/s per GPU | efficiency vs 1 GPU | MFU | peak GiB (rank 0) "
        "| interval tokens/s (min-max) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    entries = results.get("throughput", [])
    for layout in LAYOUTS:
        for e in sorted((e for e in entries if e["layout"] == layout), key=lambda e: e["gpus"] or 0):
            gpus = e["gpus"] if e["gpus"] is not None else "-"
            if "tokens_per_s" not in e:
                lines.append(f"| {layout} | {gpus} | | {e.get('error', 'missing')} | | | | | |")
                continue
            rates = e.get("interval_rates")
            spread = f"{min(rates):,.0f}-{max(rates):,.0f}" if rates else "-"
            if "same_as" in e:
                spread = f"the {e['same_as']} run"
            lines.append(
                f"| {layout} | {gpus} | {e['global_batch_tokens']:,} | {e['tokens_per_s']:,.0f} | "
                f"{e['tokens_per_s_per_gpu']:,.0f} | {_pct(e.get('efficiency'))} | {_pct(e.get('mfu'))} | "
                f"{_fmt(e.get('peak_gib'), '.1f')} | {spread} |"
            )
    lines += ["", *(f"`{layout}`: {what}." for layout, what in LAYOUTS.items())]
    most = max((e["gpus"] for e in entries if "efficiency" in e), default=0)
    if most > 1:
        verdicts = [
            f"{e['layout']} {100 * e['efficiency']:.1f}%" for e in entries if e["gpus"] == most and "efficiency" in e
        ]
        goal = f"(goal: >= {100 * GOAL:.0f}% on 8 GPUs)"
        lines += ["", f"Efficiency on {most} GPUs {goal}: {', '.join(verdicts)}."]
    curve = results.get("curve")
    if curve:
        lines += [
            "",
            f"## Loss curve: {curve['gpus']} GPUs vs 1 GPU, {curve['batch_sequences']} sequences per step",
            "",
        ]
        if "error" in curve:
            lines.append(f"not measured: {curve['error']}")
        else:
            lines += [
                f"{curve['steps'][1]} steps; per-step relative loss gap: max {curve['max_rel_gap']:.2e} (step "
                f"{curve['max_at_step']}), mean {curve['mean_rel_gap']:.2e}.",
                "",
                f"| step | loss, {curve['gpus']} GPUs | loss, 1 GPU | relative gap |",
                "|---:|---:|---:|---:|",
            ]
            a, b = curve["losses"][str(curve["gpus"])], curve["losses"]["1"]
            every = max(1, len(a) // 8)
            for i in range(every - 1, min(len(a), len(b)), every):
                lines.append(f"| {i + 1} | {a[i]:.4f} | {b[i]:.4f} | {abs(a[i] - b[i]) / abs(b[i]):.1e} |")
    checks = results.get("resume")
    if checks:
        lines += ["", "## Sharded checkpoint saved on N GPUs, resumed on M", ""]
        lines += [
            "| saved on | resumed on | at step | steps compared | max rel. loss diff vs the uninterrupted run on the "
            "saving count | ... on the resuming count |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for c in checks:
            if "error" in c:
                lines.append(f"| {c['saved_on']} | {c['resumed_on']} | {c['step']} | {c['error']} | | |")
                continue
            a, b = c["vs_saving_count"], c["vs_resuming_count"]
            lines.append(
                f"| {c['saved_on']} | {c['resumed_on']} | {c['resumed_at_step']} | {a['steps'][0]}-{a['steps'][1]} | "
                f"{a['max_rel_gap']:.2e} | {b['max_rel_gap']:.2e} |"
            )
    runs = results.get("runs", {})
    if runs:
        lines += ["", "## Runs", ""]
        lines += ["| run | GPUs | status | wall s | NVLink multicast off in its processes |", "|---|---:|---|---:|---|"]
        for name, r in runs.items():
            off = r.get("multicast_off")
            off = "-" if off is None else f"{'yes' if off['all'] else 'NO'} ({off['processes']} checked)"
            lines.append(f"| {name} | {r['gpus']} | {r.get('error', r['status'])} | {r['wall_s']:.0f} | {off} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main
def _visible_gpus() -> list[str]:
    import torch

    count = torch.cuda.device_count()  # from NVML: no CUDA context in this process
    ids = os.environ.get("CUDA_VISIBLE_DEVICES")
    return ids.split(",")[:count] if ids else [str(i) for i in range(count)]


def _meta(args: argparse.Namespace, bench: Bench) -> dict:
    import torch

    def git(*cmd: str) -> str | None:
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    device = "cpu (gloo), smoke"
    if bench.visible:
        names = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.splitlines()
        name = names[0].split(":", 1)[1].split("(")[0].strip() if names else "GPU"
        device = f"{len(bench.visible)} x {name}"
    return {
        "date": datetime.date.today().isoformat(),
        "device": device,
        "commit": git("rev-parse", "--short", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "torch": torch.__version__,
        "command": shlex.join(["python", *sys.argv]),
        "preset": bench.preset,
        "seq_len": bench.seq_len,
        "tokens_per_gpu": bench.seq_len * bench.micro_batch,
        "mode": dataclasses.asdict(bench.mode),
        "nvls_off": NVLS_OFF,
    }


def run(args: argparse.Namespace) -> dict:
    sys.path[:0] = [str(ROOT / "src"), str(ROOT / "bench")]  # llamita from this checkout; train_throughput
    from llamita.config import load_config
    from llamita.tokenizer import Tokenizer

    mode = SMOKE if args.smoke else GPU
    data = Path(args.data).resolve()
    if not (data / "tokenizer").is_dir() or not (data / "prose").is_dir() or not (data / "code").is_dir():
        raise SystemExit(
            f"--data {args.data}: expected prepared tokenizer/, prose/ and code/ folders; write them with "
            "`PYTHONPATH=src python bench/train_throughput.py --prepare-data .benchdata`"
        )
    sources = [{"name": "prose", "path": str(data / "prose"), "weight": 0.7}]
    sources.append({"name": "code", "path": str(data / "code"), "weight": 0.3})
    data_overrides = {"data.tokenizer": str(data / "tokenizer"), "data.sources": json.dumps(sources)}
    cfg = load_config(str(RECIPE), {**data_overrides, **mode.overrides})
    visible = [] if args.smoke else _visible_gpus()
    if not args.smoke and not visible:
        raise SystemExit("no CUDA GPU here; run `python bench/scaling.py --smoke` to check the script on CPU")
    if args.gpus:
        gpus = [int(g) for g in args.gpus.split(",")]
    else:
        gpus = [1, 2] if args.smoke else sorted({g for g in (1, 2, 4, 8) if g <= len(visible)} | {len(visible)})
    if visible and max(gpus) > len(visible):
        raise SystemExit(f"--gpus {args.gpus}: only {len(visible)} GPU(s) here")
    asked = {x for x in args.layouts.split(",") if x}
    if asked - set(LAYOUTS):
        raise SystemExit(f"--layouts: unknown {sorted(asked - set(LAYOUTS))}; choose from {', '.join(LAYOUTS)}")
    layouts = [x for x in LAYOUTS if x in asked]  # replicate's one-GPU run is fsdp2-reshard-false's: that one first
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bench = Bench(
        mode=mode,
        out=out,
        work=Path(tempfile.mkdtemp(prefix="llamita-scaling-", dir=args.workdir or None)),
        deadline=time.monotonic() + args.deadline,
        timeout=args.timeout,
        data=data_overrides,
        visible=visible,
        preset=cfg.model.preset,
        seq_len=cfg.data.seq_len,
        micro_batch=cfg.train.micro_batch,
        vocab_size=Tokenizer.load(cfg.data.tokenizer).vocab_size,
    )
    results: dict[str, Any] = {"meta": _meta(args, bench), "throughput": []}
    try:
        if layouts:
            run_throughput(bench, gpus, layouts, results)
        if args.loss_curve or args.resume_check:
            steps = args.curve_steps or mode.curve_steps
            run_curve_and_resume(bench, max(gpus), steps, args.resume_check, results)
    finally:
        bench.save(results)
        shutil.rmtree(bench.work, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, gloo, the debug preset, 1 and 2 processes")
    parser.add_argument("--gpus", default="", help="comma list of GPU counts (default 1, 2, 4, 8 as there are)")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma list of {', '.join(LAYOUTS)}")
    parser.add_argument("--loss-curve", action="store_true", help="most GPUs vs 1 GPU, same global batch")
    parser.add_argument("--resume-check", action="store_true", help="resume each curve run on the other count")
    parser.add_argument("--curve-steps", type=int, default=0, help="steps of the curve runs (default 200; smoke 8)")
    parser.add_argument("--data", default=".benchdata", help="folder from train_throughput.py --prepare-data")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench/out"), help="results folder")
    parser.add_argument("--workdir", default="", help="where run folders go (default: the system temp folder)")
    parser.add_argument("--deadline", type=float, default=570.0, help="seconds for the whole call")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for one run")
    parser.add_argument("--tables", default="", help="print the tables of a results JSON and exit")
    parser.add_argument("--litgpt-worker", default="", help=argparse.SUPPRESS)
    parser.add_argument("--result", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.litgpt_worker:
        litgpt_worker(json.loads(args.litgpt_worker), Path(args.result))
        return
    if args.tables:
        print(tables(json.loads(Path(args.tables).read_text())))
        return
    results = run(args)
    print()
    print(tables(results))


if __name__ == "__main__":
    main()
