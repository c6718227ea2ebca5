"""What the progress lines measure: the window of steps since the last one, and the efficiency figures (MFU)."""

import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

H100_BF16_FLOPS = 989e12  # dense bf16 peak of an H100 SXM: the MFU denominator on CUDA unless the spec says otherwise


class Window:
    """The steps since the last progress line: the objective's summed figures (kept on the device, so reading them
    is the loop's only host sync), their units (loss tokens, or pairs), how many steps, and when the window
    started."""

    def __init__(self, device: torch.device, start: float, figures: int = 1):
        self.sums, self.units, self.steps, self.start = torch.zeros(figures, device=device), 0, 0, start

    def add(self, sums: torch.Tensor, units: int) -> None:
        self.sums += sums
        self.units += units
        self.steps += 1

    def means(self, world_size: int, keep: bool = False) -> list[float]:
        """Each figure's mean over the window's units of every rank, the loss first (a collective: all ranks call
        it); `keep` leaves the window as it was."""
        total = self.sums.clone() if keep else self.sums
        if world_size > 1:
            dist.all_reduce(total)
        return [value / max(1, self.units) for value in total.tolist()]

    def reset(self, now: float) -> None:
        self.sums.zero_()
        self.units, self.steps, self.start = 0, 0, now

    @contextmanager
    def paused(self) -> Iterator[float]:
        """A pause in training (an eval, a checkpoint, generation), given its start: tokens_per_s measures training
        only, so the window's start moves on by the pause's length."""
        start = time.time()
        yield start
        self.start += time.time() - start


def flops_per_token(params: int, trainable: int, layers: int, hidden_size: int, context_length: int) -> int:
    """Training FLOPs per token, as PaLM's MFU counts them: 2N forward, 2N for the backward through the activations,
    2N more for the weight gradients (only of the weights that train: a LoRA run skips the frozen ones), and
    12·L·d·T for attention."""
    return 4 * params + 2 * trainable + 12 * layers * hidden_size * context_length


def peak_memory_mb(device: torch.device) -> float:
    """The most memory this process has held, in MiB: allocated tensors on a GPU, the peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10
