"""A training step replayed from a CUDA graph: the demo UNet is too small to keep an H100 busy.

At 3.9 M parameters a UNet step is thousands of tiny kernels, and launching them from Python costs
more than running them: the fine-tune's step took ~0.2 s at 16 clips and about the same at 64. A CUDA
graph records the whole step (forward, backward, gradient clipping, AdamW) once and replays it with
one launch. PyTorch's ``torch.cuda.graph`` does the capture; what it leaves to the caller, done here:
eager warm-up on a side stream before capture, fixed input buffers the next batch is copied into,
gradients released before capture so backward allocates them from the graph's pool, and outputs
copied out before the next replay overwrites them (see PyTorch's "whole-network capture" notes).

The step function must be a fixed sequence of kernels on fixed-shape tensors: no host syncs, no
random draws (draw them into the inputs), no Python branches on tensor values, and an optimizer
built with ``capturable=True`` (its learning rate a device tensor updated in place).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

StepFn = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


class TrainStep:
    """Zero the gradients, run ``step_fn`` (which backpropagates and steps the optimizer), return its stats.

    ``graphed`` (CUDA only) captures the step after ``warmup`` eager calls and replays it from then on;
    the eager and replayed steps compute the same thing.
    """

    def __init__(self, step_fn: StepFn, optimizer: torch.optim.Optimizer, graphed: bool, warmup: int = 3) -> None:
        self.step_fn = step_fn
        self.optimizer = optimizer
        self.graphed = graphed
        self.warmup = warmup
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_inputs: dict[str, torch.Tensor] = {}
        self.static_outputs: dict[str, torch.Tensor] = {}

    def __call__(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.calls += 1
        if not self.graphed:
            self.optimizer.zero_grad(set_to_none=True)
            return self.step_fn(inputs)
        if self.graph is None and self.calls <= self.warmup:
            return self._eager_on_side_stream(inputs)
        if self.graph is None:
            self._capture(inputs)
        else:
            for key, value in inputs.items():
                self.static_inputs[key].copy_(value)
        self.graph.replay()
        return {key: value.clone() for key, value in self.static_outputs.items()}

    def _eager_on_side_stream(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Warm-up steps (real steps) on a side stream: capture needs its libraries' state initialised
        off the capturing stream, and the optimizer's state must exist before it is captured."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.optimizer.zero_grad(set_to_none=True)
            stats = self.step_fn(inputs)
        torch.cuda.current_stream().wait_stream(side)
        return stats

    def _capture(self, inputs: dict[str, torch.Tensor]) -> None:
        """Record one step on copies of ``inputs``; the caller replays it (capture itself runs nothing)."""
        self.static_inputs = {key: value.clone() for key, value in inputs.items()}
        self.optimizer.zero_grad(set_to_none=True)  # backward then allocates .grad inside the graph's pool
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_outputs = self.step_fn(self.static_inputs)
