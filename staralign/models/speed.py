"""Inference speed paths: channels_last, autocast (:mod:`staralign.precision`), torch.compile and CUDA graphs.

Each path is optional and independent; ``make_inference_fn`` chains the ones
asked for into a callable ``images -> StarOutput`` (last stack only).  None of
them changes the maths, only precision and scheduling, so each is checked
against the float32 eager model with ``max_landmark_difference``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..precision import autocast
from .hourglass import StarOutput

__all__ = [
    "CudaGraphRunner",
    "make_inference_fn",
    "max_landmark_difference",
]

InferenceFn = Callable[[Tensor], StarOutput]


class CudaGraphRunner:
    """Replays one captured CUDA graph of ``fn`` for a fixed input shape, dtype and device.

    Cuts the per-kernel launch cost that dominates small-batch latency.  Inputs
    are copied into a static buffer; outputs are cloned out of the graph's
    memory unless ``copy_outputs=False`` (then the next call overwrites them).
    """

    def __init__(
        self, fn: InferenceFn, example: Tensor, warmup: int = 3, copy_outputs: bool = True
    ) -> None:
        if example.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device; the example input is on "
                             f"{example.device}")
        self.copy_outputs = copy_outputs
        # The graph replays raw addresses: the weights, buffers and cached grids it read at
        # capture must outlive it, so hold on to ``fn`` (and through it the model).  Without
        # this, ``make_inference_fn(copy.deepcopy(model), ...)`` frees them and replays NaN.
        self.fn = fn
        with torch.inference_mode(False):  # a normal tensor: __call__ writes into it anywhere
            self.static_input = example.detach().clone()
        side = torch.cuda.Stream(example.device)
        # No autograd records in the graph.  Warm-up fills lazily built state (cuDNN plans,
        # library handles and workspaces, compiled kernels, coordinate grids) first: once on
        # the current stream, as any eager call would, then off it, as the capture requires.
        with torch.no_grad():
            fn(self.static_input)
            side.wait_stream(torch.cuda.current_stream(example.device))
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    fn(self.static_input)
            torch.cuda.current_stream(example.device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static_output = fn(self.static_input)

    def __call__(self, images: Tensor) -> StarOutput:
        ref = self.static_input
        if images.shape != ref.shape or images.dtype != ref.dtype or images.device != ref.device:
            raise ValueError(
                f"this CUDA graph was captured for {tuple(ref.shape)} {ref.dtype} on {ref.device}; "
                f"got {tuple(images.shape)} {images.dtype} on {images.device}"
            )
        self.static_input.copy_(images)
        self.graph.replay()
        if not self.copy_outputs:
            return self.static_output
        out = self.static_output
        return StarOutput(
            out.landmarks.clone(),
            tuple(t.clone() for t in out.heatmaps),
            tuple(t.clone() for t in out.pointmaps),
            tuple(t.clone() for t in out.edgemaps),
        )


def make_inference_fn(
    model: nn.Module,
    *,
    channels_last: bool = False,
    amp: str | None = None,
    compile: bool = False,
    cuda_graphs: bool = False,
    example: Tensor | None = None,
    compile_mode: str | None = None,
    stacks: int | None = None,
) -> InferenceFn:
    """``images -> StarOutput`` (last stack only) with the requested speed paths.

    ``channels_last`` converts ``model`` in place.  ``cuda_graphs`` captures at
    the shape of ``example`` and then accepts only that shape.  ``stacks=K``: early exit
    at the K-th stack.  Call it under ``torch.inference_mode()`` for the full benefit.

    ``amp="bf16"`` on a CPU is autocast to bfloat16: oneDNN runs the convolutions in
    bf16 (AVX512-BF16 or AMX where the CPU has them); with ``channels_last`` it avoids
    reordering every activation to its blocked layout and back.
    """
    model.eval()
    device = next(model.parameters()).device
    if channels_last:
        model.to(memory_format=torch.channels_last)
    net: Callable = torch.compile(model, mode=compile_mode) if compile else model

    def run(images: Tensor) -> StarOutput:
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            return net(images, all_stacks=False, stacks=stacks)

    if not cuda_graphs:
        return run
    if example is None:
        raise ValueError("cuda_graphs=True needs an example input to capture with")
    return CudaGraphRunner(run, example.to(device))


@torch.no_grad()
def max_landmark_difference(fn: InferenceFn, reference: nn.Module, images: Tensor,
                            stacks: int | None = None) -> float:
    """Largest absolute landmark difference (normalised units) between ``fn`` and ``reference``."""
    expected = reference(images, all_stacks=False, stacks=stacks).landmarks.float()
    got = fn(images).landmarks.float()
    return float((got - expected).abs().max())
