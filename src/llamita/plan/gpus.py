"""The GPU catalogue of the planner and of MFU: usable memory and dense bf16 peak of each kind (no torch)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from llamita.plan.errors import PlanError


@dataclass(frozen=True)
class GPU:
    """One kind of GPU as the planner sees it."""

    name: str
    """Catalogue name, e.g. `H100-80G`."""
    memory_gib: float
    """Memory a process can use: `torch.cuda.mem_get_info()`'s total (what out-of-memory errors call the total
    capacity), a little under the card's nominal size."""
    peak_bf16_flops: float
    """Dense bf16 tensor-core peak, FLOP/s (no sparsity), the MFU denominator."""


GPUS: dict[str, GPU] = {
    gpu.name: gpu
    for gpu in (
        GPU("A100-40G", 39.4, 312e12),
        GPU("A100-80G", 79.1, 312e12),
        GPU("H100-80G", 79.1, 989e12),
        GPU("H200-141G", 139.8, 989e12),
        GPU("L40S-48G", 44.4, 362e12),
        GPU("RTX4090-24G", 23.6, 165.2e12),
        GPU("A10G-24G", 22.0, 125e12),
    )
}
"""The GPU catalogue; `llamita.train.metrics` reads its MFU peaks from it."""


def get_gpu(name: str) -> GPU:
    """Look up a GPU by catalogue name, case-insensitively; `H100` or `A100-40GB` work where unambiguous.

    Args:
        name: A key of `GPUS`, or its part before the dash when only one entry has it.

    Returns:
        The catalogue entry.

    Raises:
        PlanError: Unknown or ambiguous name; the message lists the known GPUs.
    """
    key = re.sub(r"\s+", "", name).upper().removesuffix("B")
    matches = [gpu for gpu in GPUS.values() if key in (gpu.name.upper(), gpu.name.upper().split("-")[0])]
    if len(matches) == 1:
        return matches[0]
    what = "ambiguous" if matches else "unknown"
    raise PlanError(f"gpu: {what} GPU {name!r}; known GPUs: {', '.join(GPUS)}")


def parse_gpus(spec: str) -> tuple[int, GPU]:
    """Read a GPU count and kind such as `16xA100-40G`, `8xH100` or `H200` (one GPU).

    Args:
        spec: `[COUNTx]NAME`, NAME as `get_gpu` takes it.

    Returns:
        (count, GPU).

    Raises:
        PlanError: The count is not a positive integer or the GPU is unknown.
    """
    match = re.fullmatch(r"\s*(?:(\d+)\s*[x*]\s*)?(\S.*?)\s*", spec, flags=re.IGNORECASE)
    if match is None:
        raise PlanError(f"gpus: expected COUNTxGPU such as 8xH100-80G, got {spec!r}")
    count = int(match.group(1)) if match.group(1) else 1
    if count < 1:
        raise PlanError(f"gpus: the GPU count must be at least 1, got {spec!r}")
    return count, get_gpu(match.group(2))
