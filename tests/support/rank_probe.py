"""A stand-in for diffusers' context-parallel split, for the CPU test of the rank fan-out.

diffusers' `enable_parallelism` needs an accelerator (it picks `cuda:rank`), so on a CPU the test
cannot split attention. What it can check is what the worker itself adds: that every rank makes
every denoiser call of every batch, in lockstep. This hook makes each UNet call all-reduce its
batch size and timestep over the real gloo group; a rank that missed a batch would leave the
others blocked in the collective. Rank 0 (the test process) keeps the sums.
"""

from __future__ import annotations

from typing import Any

# Per denoiser call on rank 0: (sum over ranks of the batch rows, of the timestep) / its own.
SUMS: list[tuple[float, float]] = []


def all_reduce_each_denoiser_call(pipeline: Any, settings: Any) -> None:
    """Install the lockstep probe on the UNet (the `Parallelize` hook of context_parallel.start)."""
    pipeline.unet.register_forward_pre_hook(_probe, with_kwargs=True)


def _probe(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    import torch
    import torch.distributed as dist

    sample = args[0] if args else kwargs["sample"]
    timestep = args[1] if len(args) > 1 else kwargs["timestep"]
    value = torch.tensor([float(sample.shape[0]), float(torch.as_tensor(timestep).flatten()[0])])
    dist.all_reduce(value)
    if dist.get_rank() == 0:
        rows, step = float(sample.shape[0]), float(torch.as_tensor(timestep).flatten()[0])
        SUMS.append((float(value[0]) / rows, float(value[1]) / step if step else 2.0))


def fail_on_rows(rows: int, ranks: tuple[int, ...], pipeline: Any, settings: Any) -> None:
    """The lockstep probe, plus a failure: on the given ranks, a denoiser call of `rows` rows raises
    ValueError before its all-reduce, so the other ranks (if any) are left waiting in it. Bind
    the first two arguments with functools.partial (spawned ranks need a picklable hook)."""
    import torch.distributed as dist

    def fail(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        sample = args[0] if args else kwargs["sample"]
        if sample.shape[0] == rows and dist.get_rank() in ranks:
            raise ValueError(f"rank {dist.get_rank()} refuses {rows} rows")

    pipeline.unet.register_forward_pre_hook(fail, with_kwargs=True)
    all_reduce_each_denoiser_call(pipeline, settings)
