"""Context parallelism: K processes (ranks) share every image, one GPU each.

Rank 0 is the serving process. At start-up it checks that the model can be split, starts ranks
1..K-1 as child processes, and all K join one torch.distributed group; each loads the pipeline on
its own GPU and splits the denoiser's attention over the group with diffusers'
`ContextParallelConfig` (ulysses or ring). Each batch the scheduler hands rank 0 is first broadcast
to the others, so all ranks make the same pipeline call with the same seeds; rank 0 returns the
images, the others drop theirs. Closing broadcasts a stop and waits for the children.

Limits: no step callbacks (a rank cannot stop early alone without leaving the others waiting in a
collective), so cancellation and streamed previews are off; a failure on one rank (an
out-of-memory error, say) stops the worker rather than the one batch.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import multiprocessing
import socket
from collections.abc import Callable
from typing import Any

from diffusion_worker.engine import (
    DiffusersEngine,
    GenerationBatch,
    KeepGoing,
    ModelLoadError,
    warm_up,
)
from diffusion_worker.pipeline_options import denoiser_of
from diffusion_worker.previews import PreviewPlan
from diffusion_worker.settings import WorkerSettings

log = logging.getLogger(__name__)

# How long a rank waits in a collective (for a batch, or for the others) before giving up.
COLLECTIVE_TIMEOUT = dt.timedelta(hours=1)
# Rank -> device. On GPUs rank r uses cuda:r; tests give CPU ranks.
DeviceForRank = Callable[[int], str]
# Splits the loaded pipeline's denoiser over the process group (diffusers' enable_parallelism).
Parallelize = Callable[[Any, WorkerSettings], None]


def enable_context_parallel(pipeline: Any, settings: WorkerSettings) -> None:
    """Split the denoiser's attention over all ranks, ulysses (heads) or ring (sequence)."""
    from diffusers import ContextParallelConfig

    degree = settings.context_parallel_size
    config = (
        ContextParallelConfig(ulysses_degree=degree)
        if settings.context_parallel_mode == "ulysses"
        else ContextParallelConfig(ring_degree=degree)
    )
    try:
        denoiser_of(pipeline).enable_parallelism(config=config)
    except (ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"--context-parallel-size {degree}: {exc}") from exc


def check_supported(pipeline: Any, settings: WorkerSettings) -> None:
    """Refuse, before any rank starts, a model or set-up that context parallelism cannot serve."""
    denoiser = getattr(pipeline, "transformer", None)
    size = settings.context_parallel_size
    if denoiser is None or getattr(denoiser, "_cp_plan", None) is None:
        name = type(denoiser_of(pipeline)).__name__
        raise ModelLoadError(
            f"--context-parallel-size {size}: {name} does not support context parallelism (diffusers "
            "has a context-parallel plan for transformer models such as Flux, Qwen-Image and Wan, "
            "not for UNets); use --data-parallel-size to use several GPUs"
        )
    heads = getattr(denoiser.config, "num_attention_heads", None)
    if settings.context_parallel_mode == "ulysses" and isinstance(heads, int) and heads % size:
        raise ModelLoadError(
            f"--context-parallel-size {size}: ulysses splits attention heads, and {type(denoiser).__name__} "
            f"has {heads}, not a multiple of {size}; use --context-parallel-mode ring"
        )


def gpu_for_rank(rank: int) -> str:
    """Rank r runs on cuda:r."""
    return f"cuda:{rank}"


def check_gpus(settings: WorkerSettings) -> None:
    """One GPU per rank, all visible to this pod."""
    import torch

    size = settings.context_parallel_size
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if available < size:
        raise ModelLoadError(
            f"--context-parallel-size {size} needs {size} GPUs, one per rank; {available} visible"
        )


class ContextParallelEngine:
    """Rank 0's engine: each `generate` fans the batch out to every rank, then runs its share."""

    def __init__(self, engine: DiffusersEngine, processes: list[Any]) -> None:
        self.engine = engine
        self.processes = processes
        self.device = engine.device
        self.info = dataclasses.replace(engine.info, supports_step_callback=False)

    def generate(
        self, batch: GenerationBatch, keep_going: KeepGoing | None = None, previews: PreviewPlan | None = None
    ) -> list[Any]:
        """Broadcast `batch`, then make it here; `keep_going` and `previews` are not supported."""
        broadcast(batch)
        return self.engine.generate(batch)

    def close(self) -> None:
        """Tell the other ranks to stop, wait for them, leave the group."""
        import torch.distributed as dist

        try:
            broadcast(None)
        finally:
            for process in self.processes:
                process.join(timeout=60)
                if process.is_alive():
                    process.kill()
            if dist.is_initialized():
                dist.destroy_process_group()
            self.engine.close()


def broadcast(batch: GenerationBatch | None) -> GenerationBatch | None:
    """Rank 0 sends `batch` (None: stop); the other ranks get it back."""
    import torch.distributed as dist

    message: list[GenerationBatch | None] = [batch]
    dist.broadcast_object_list(message, src=0)
    return message[0]


def join_group(settings: WorkerSettings, rank: int, address: str, device: str) -> None:
    """Join the torch.distributed group: NCCL between GPUs, gloo on CPUs."""
    import torch
    import torch.distributed as dist

    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if device.startswith("cuda") else "gloo",
        init_method=address,
        rank=rank,
        world_size=settings.context_parallel_size,
        timeout=COLLECTIVE_TIMEOUT,
    )


def follow(settings: WorkerSettings, rank: int, address: str, device: str, parallelize: Parallelize) -> None:
    """Ranks 1..K-1: load, split, then make every batch rank 0 broadcasts until it says stop."""
    import torch.distributed as dist

    join_group(settings, rank, address, device)
    try:
        engine = DiffusersEngine.load(settings, device, warm=False)
        parallelize(engine.pipeline, settings)
        while (batch := broadcast(None)) is not None:
            engine.generate(batch)
    finally:
        dist.destroy_process_group()


def free_address() -> str:
    """A loopback TCP rendezvous address nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{probe.getsockname()[1]}"


def start(
    settings: WorkerSettings,
    *,
    device_for_rank: DeviceForRank = gpu_for_rank,
    parallelize: Parallelize = enable_context_parallel,
) -> ContextParallelEngine:
    """Load rank 0 here, start the other ranks, and return rank 0's engine once all are ready."""
    if device_for_rank is gpu_for_rank:
        check_gpus(settings)
    engine = DiffusersEngine.load(settings, device_for_rank(0), warm=False)
    if parallelize is enable_context_parallel:
        check_supported(engine.pipeline, settings)
    address = free_address()
    spawn = multiprocessing.get_context("spawn")
    processes = [
        spawn.Process(
            target=follow,
            args=(settings, rank, address, device_for_rank(rank), parallelize),
            name=f"context-parallel-rank-{rank}",
            daemon=True,
        )
        for rank in range(1, settings.context_parallel_size)
    ]
    for process in processes:
        process.start()
    join_group(settings, 0, address, engine.device)
    parallelize(engine.pipeline, settings)
    log.info(
        "context parallel: %d ranks (%s)", settings.context_parallel_size, settings.context_parallel_mode
    )
    parallel = ContextParallelEngine(engine, processes)
    if settings.compile:
        warm_up(parallel, settings)
    return parallel
