"""The step guard: decides on the device whether an optimizer step may change the weights.

A step is skipped when its loss or gradient norm is NaN/Inf on any rank, or, with the loss-spike guard on, when
the mean loss over ranks exceeds the mean + k·σ of the last `window` applied steps. The decision never leaves the
device: it is handed to the fused AdamW kernel as `found_inf`, which then leaves weights, moments and its step
count untouched. Counters (skipped steps, spikes, the current streak) and the spike window are device tensors too.

The host learns the outcome one step late: each step's summary is copied to pinned host memory as soon as it is
computed (`HostCopy`), and after enqueuing step t the trainer waits for the copy of step t-1 only, not for the
work queued behind it. The host therefore stays up to one step ahead of the device (no drain of the queue at
each step boundary), and every rank reads the same all-reduced values, so all ranks take the same decision (stop
for a signal, stop for too many bad steps) after the same step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


class StepGuard:
    """Device-side bookkeeping of skipped steps for one training run.

    Args:
        device: where the counters live (the training device).
        world_size: ranks that take part in each step (1 without torch.distributed).
        spike_sigma: skip a step whose loss exceeds mean + spike_sigma·std of the recent window (0 disables).
        spike_window: how many recent applied steps form the window; the guard acts once the window is full.
    """

    def __init__(self, device: torch.device, world_size: int, spike_sigma: float = 0.0, spike_window: int = 0) -> None:
        if spike_sigma < 0 or spike_window < 0 or (spike_sigma > 0 and spike_window < 2):
            raise ValueError(
                f"spike guard: sigma {spike_sigma} and window {spike_window}; sigma must be >= 0 (0 disables) "
                "and the window at least 2 steps when it is on"
            )
        self.device = device
        self.world_size = world_size
        self.spike_sigma = spike_sigma
        zero = torch.zeros((), device=device)
        self.skipped = zero.clone()  # steps skipped so far (NaN/Inf and spikes)
        self.spikes = zero.clone()  # of which loss spikes
        self.streak = zero.clone()  # consecutive skipped steps up to the last one
        self.window = torch.zeros(spike_window if spike_sigma > 0 else 0, device=device)  # oldest first
        self.filled = zero.clone()  # valid entries at the end of `window`

    def check(
        self, loss: torch.Tensor, grad_norm: torch.Tensor, stop_requested: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decide step t from this rank's mean loss and the global grad norm; all on the device, no host sync.

        Returns:
            (skip, summary): `skip` is 1.0 if the update must be skipped, else 0.0 (for `found_inf`); `summary` is
            [skipped so far, spikes so far, current streak, stop requested on any rank], for the host to read
            after the next step is enqueued.
        """
        stop = torch.full((), float(stop_requested), device=self.device)
        nonfinite = (~(torch.isfinite(loss) & torch.isfinite(grad_norm))).float()
        shared = torch.stack([loss.float(), nonfinite, stop])
        if self.world_size > 1:
            dist.all_reduce(shared, op=dist.ReduceOp.SUM)  # loss summed, flags counted over ranks
        mean_loss = shared[0] / self.world_size
        nonfinite = (shared[1] > 0) | ~torch.isfinite(mean_loss)
        spike = torch.zeros((), dtype=torch.bool, device=self.device)
        if self.spike_sigma > 0:
            full = self.filled >= self.window.numel()
            limit = self.window.mean() + self.spike_sigma * self.window.std()
            spike = full & ~nonfinite & (mean_loss > limit)
        skip = (nonfinite | spike).float()
        self.skipped += skip
        self.spikes += spike.float()
        self.streak = (self.streak + skip) * skip
        if self.spike_sigma > 0:
            # Only applied steps enter the window: a skipped spike must not raise the bar for the next one.
            rolled = torch.cat([self.window[1:], mean_loss.detach().reshape(1)])
            self.window = torch.where(skip > 0, self.window, rolled)
            self.filled = torch.clamp(self.filled + 1 - skip, max=self.window.numel())
        summary = torch.stack([self.skipped, self.spikes, self.streak, (shared[2] > 0).float()])
        return skip, summary

    def state_dict(self) -> dict[str, Any]:
        """Counters and spike window as plain JSON values (reads the device: call at checkpoint time)."""
        return {
            "skipped_steps": int(self.skipped.item()),
            "spike_steps": int(self.spikes.item()),
            "bad_streak": int(self.streak.item()),
            "spike_window": self.window.tolist(),
            "spike_filled": int(self.filled.item()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict`; a window of another length (recipe changed) starts empty."""
        self.skipped.fill_(state.get("skipped_steps", 0))
        self.spikes.fill_(state.get("spike_steps", 0))
        self.streak.fill_(state.get("bad_streak", 0))
        window = state.get("spike_window", [])
        if len(window) == self.window.numel() and self.window.numel() > 0:
            self.window = torch.tensor(window, dtype=self.window.dtype, device=self.device)
            self.filled.fill_(state.get("spike_filled", 0))


class HostCopy:
    """A small device tensor on its way to the host: `values()` waits for it alone, not for later queued work.

    A plain `.tolist()` would wait for everything enqueued on the stream so far (a stream runs in order), i.e.
    for the step enqueued after this tensor was made; the copy and the event are enqueued right behind it instead.
    """

    def __init__(self, tensor: torch.Tensor) -> None:
        self.event: torch.cuda.Event | None = None
        if tensor.device.type == "cuda":
            self.host = tensor.to("cpu", non_blocking=True)  # pinned destination, copied asynchronously
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = tensor

    def values(self) -> list[float]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()
