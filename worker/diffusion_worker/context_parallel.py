"""Context parallelism: K processes (ranks) share every image, one GPU each.

Rank 0 is the serving process. At start-up it starts ranks 1..K-1 as child processes; every rank
loads the pipeline on its own GPU, at the same time; rank 0 checks that the model can be split;
then all K join one torch.distributed group and split the denoiser's attention over it with
diffusers' `ContextParallelConfig` (ulysses or ring). A rank that exits before it is ready (it
could not load the model, say) fails start-up with ModelLoadError instead of leaving rank 0
waiting for it.

Each batch the scheduler hands rank 0 is first sent to the others, so all ranks make the same
pipeline call with the same seeds; rank 0 returns the images, the others drop theirs and report
how their call ended. Closing sends a stop and waits for the children.

Batches and outcomes travel over pipes, not over the process group: a rank waiting for work must
notice when rank 0 is gone, and rank 0 must notice when a rank is. Failures:
- a call that fails on every rank (an input the pipeline refuses, or every rank out of memory at
  the same step) fails that batch only; the ranks are still in step and carry on, and an
  out-of-memory batch is retried smaller by the scheduler, as on one GPU;
- a call that fails on some ranks only leaves the others blocked in a collective inside the
  denoiser, which nothing can end; a rank that exits, ranks still in a batch `grace` seconds
  after another rank finished or failed it, or a batch still running twice --request-timeout
  after it began (a rank hung without exiting: a wedged GPU or driver call) stop the worker (exit
  status 70) so that Kubernetes restarts the pod instead of it hanging with its GPUs held.

Start-up ends with one short call at the default size on every rank: diffusers splits each sequence
the model's plan shards (the image tokens, and Flux's 512 text tokens) evenly over the ranks and
asserts that it can, so a set-up that can never serve is refused before the port opens, and
requests for a size whose image tokens the ranks cannot share get a 400 (`ModelInfo.check_splits`).
The ranks ignore SIGINT and SIGTERM (a stop signal sent to the whole process group is rank 0's to
act on: it drains, then stops them) and, on Linux, die with rank 0.

Limits: no step callbacks (a rank cannot stop early alone without leaving the others waiting in a
collective), so cancellation and streamed previews are off.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime as dt
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, NoReturn

from diffusion_worker.engine import (
    DiffusersEngine,
    GenerationBatch,
    KeepGoing,
    ModelLoadError,
    default_guidance,
    start_up_batch,
    warm_up,
)
from diffusion_worker.logs import describe_error
from diffusion_worker.pipeline_options import denoiser_of
from diffusion_worker.previews import PreviewPlan
from diffusion_worker.settings import WorkerSettings

log = logging.getLogger(__name__)

# How long a rank waits in a collective inside the pipeline (or to join the group) before giving up.
COLLECTIVE_TIMEOUT = dt.timedelta(hours=1)
# How long ranks may still be in a batch after another rank finished or failed it.
OUTCOME_GRACE_SECONDS = 120.0
# The worker's exit status when the ranks fall out of step (EX_SOFTWARE).
EXIT_OUT_OF_STEP = 70
# A batch still running this many --request-timeouts after it began is taken for hung: every
# request in it has had its 504 by then, and a call on the ranks cannot be stopped at a step.
HUNG_AFTER_REQUEST_TIMEOUTS = 2
# Linux prctl option: the signal the kernel sends this process when its parent ends.
PR_SET_PDEATHSIG = 1
# What the other ranks say at start-up, before any (batch number, error) outcome.
LOADED = "loaded"
READY = "ready"
# Rank -> device. On GPUs rank r uses cuda:r; tests give CPU ranks.
DeviceForRank = Callable[[int], str]
# Splits the loaded pipeline's denoiser over the process group (diffusers' enable_parallelism).
Parallelize = Callable[[Any, WorkerSettings], None]
# Ends the worker when its ranks can no longer work together; gets the reason.
StopWorker = Callable[[str], None]


class RanksOutOfStepError(Exception):
    """The ranks can no longer work together; the worker is being stopped."""


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


@dataclass
class Rank:
    """Rank 0's handle on one of the other ranks."""

    number: int
    process: Any  # multiprocessing.Process
    batches: Connection  # rank 0 sends (batch number, batch) or None (stop)
    outcomes: Connection  # the rank answers (batch number, None or the error)


@dataclass
class _Progress:
    """What rank 0 knows of the batch in hand; guarded by ContextParallelEngine._condition."""

    batch: int = 0
    started: float | None = None  # time.monotonic() when rank 0 handed `batch` out
    running: bool = False  # rank 0's own call for `batch` has not ended
    failed_at: float | None = None  # when another rank first reported failing `batch`
    outcomes: dict[int, str | None] = field(default_factory=dict)  # rank -> error, for `batch`

    @property
    def failures(self) -> dict[int, str]:
        """The ranks that failed `batch`, with their errors."""
        return {rank: error for rank, error in self.outcomes.items() if error}


class ContextParallelEngine:
    """Rank 0's engine: each `generate` hands the batch to every rank, makes it here, and waits
    for the others to report; a monitor thread stops the worker when the ranks fall out of step."""

    def __init__(
        self,
        engine: DiffusersEngine,
        ranks: list[Rank],
        *,
        grace: float = OUTCOME_GRACE_SECONDS,
        stop_worker: StopWorker | None = None,
    ) -> None:
        self.engine = engine
        self.ranks = ranks
        self.processes = [rank.process for rank in ranks]
        self.device = engine.device
        self.info = dataclasses.replace(
            engine.info, supports_step_callback=False, context_parallel_size=len(ranks) + 1
        )
        self.grace = grace
        self.hung_after: float | None = None  # set by `serve` once start-up is over
        self._stop_worker = stop_worker or exit_worker(self.processes)
        self._condition = threading.Condition()
        self._progress = _Progress()
        self._closing = False
        self._stopped: str | None = None
        self._monitor = threading.Thread(target=self._watch, name="context-parallel-monitor", daemon=True)
        self._monitor.start()

    def generate(
        self, batch: GenerationBatch, keep_going: KeepGoing | None = None, previews: PreviewPlan | None = None
    ) -> list[Any]:
        """Make `batch` on every rank; `keep_going` and `previews` are not supported."""
        with self._condition:
            if self._stopped is not None:
                raise RanksOutOfStepError(self._stopped)
            number = self._progress.batch + 1
            self._progress = _Progress(batch=number, started=time.monotonic(), running=True)
        for rank in self.ranks:
            try:
                rank.batches.send((number, batch))
            except OSError as exc:
                self._stop(f"rank {rank.number} cannot be reached ({exc})")
                raise RanksOutOfStepError(f"rank {rank.number} cannot be reached") from exc
        error: BaseException | None = None
        try:
            images = self.engine.generate(batch)
        except BaseException as exc:  # re-raised below once the other ranks have answered
            error = exc
        with self._condition:
            progress = self._progress
            progress.running = False
            answered = self._condition.wait_for(
                lambda: len(progress.outcomes) == len(self.ranks) or self._stopped is not None,
                timeout=self.grace,
            )
        failed = progress.failures
        if not answered:
            missing = sorted({rank.number for rank in self.ranks} - set(progress.outcomes))
            ending = f"failed: {error}" if error is not None else "finished"
            self._stop(
                f"rank(s) {missing} still in batch {number} {self.grace:g}s after rank 0 {ending}; "
                "they are blocked in a collective"
            )
        if self._stopped is not None:
            raise RanksOutOfStepError(self._stopped)
        if error is not None:
            raise error
        if failed:  # after the last collective (the VAE decode, say): rank 0's images are whole
            log.warning("batch %d: rank 0 made it, but %s", number, describe(failed))
        return images

    def serve(self, grace: float, hung_after: float) -> None:
        """Start-up is over: from now on wait `grace` for the ranks' outcomes, and stop the worker
        when a batch has run `hung_after` without every rank ending it. Start-up's calls wait
        OUTCOME_GRACE_SECONDS and are never taken for hung: a compile warm-up may take longer than
        a request may, and a rank still warming its caches may lag behind."""
        with self._condition:
            self.grace = grace
            self.hung_after = hung_after

    def _watch(self) -> None:
        """Read the ranks' outcomes; stop the worker when a rank exits, when rank 0 is still in a
        batch `grace` seconds after another rank failed it, or when a batch has run past
        `hung_after` (a rank that hangs without exiting)."""
        by_pipe = {rank.outcomes: rank for rank in self.ranks}
        by_sentinel = {rank.process.sentinel: rank for rank in self.ranks}
        while True:
            ready = wait([*by_pipe, *by_sentinel], timeout=min(1.0, self.grace / 4))
            with self._condition:
                if self._closing or self._stopped is not None:
                    return
            for item in ready:
                if item in by_pipe:
                    self._record(by_pipe[item])
            for item in ready:
                if item in by_sentinel:
                    rank = by_sentinel[item]
                    rank.process.join(timeout=5)  # reaps it, so that exitcode is known
                    self._stop(f"rank {rank.number} exited (status {rank.process.exitcode})")
                    return
            with self._condition:
                progress = self._progress
                # A rank that finished passed every collective, so rank 0 did too; one that failed
                # may have left rank 0 waiting in one.
                stuck = (
                    progress.running
                    and progress.failed_at is not None
                    and time.monotonic() - progress.failed_at > self.grace
                )
                failed = progress.failures
                hung = self._hung(progress)
            if stuck:
                self._stop(
                    f"rank 0 still in batch {progress.batch} {self.grace:g}s after {describe(failed)}; "
                    "it is blocked in a collective"
                )
                return
            if hung is not None:
                self._stop(hung)
                return

    def _hung(self, progress: _Progress) -> str | None:
        """Why `progress`'s batch is taken for hung, or None. Called with the condition held.

        A rank stopped inside the pipeline (a wedged GPU, a driver call that never returns) neither
        exits nor reports, and the others wait for it in a collective for COLLECTIVE_TIMEOUT (an
        hour) while every request times out and /health answers 200."""
        if self.hung_after is None or progress.started is None:
            return None
        age = time.monotonic() - progress.started
        missing = sorted({rank.number for rank in self.ranks} - set(progress.outcomes))
        if age <= self.hung_after or not (progress.running or missing):
            return None
        still = ([0] if progress.running else []) + missing
        return (
            f"batch {progress.batch} has run {age:.0f}s, past {self.hung_after:g}s "
            f"({HUNG_AFTER_REQUEST_TIMEOUTS}x --request-timeout), and rank(s) {still} have not ended it; "
            "a rank is hung"
        )

    def _record(self, rank: Rank) -> None:
        try:
            number, error = rank.outcomes.recv()
        except (EOFError, OSError):
            return  # the rank is exiting; its sentinel says so
        with self._condition:
            progress = self._progress
            if number != progress.batch:
                return
            progress.outcomes[rank.number] = error
            if error is not None and progress.failed_at is None:
                progress.failed_at = time.monotonic()
            self._condition.notify_all()

    def _stop(self, reason: str) -> None:
        with self._condition:
            first = self._stopped is None
            self._stopped = self._stopped or reason
            self._condition.notify_all()
        if first:
            self._stop_worker(reason)

    def close(self) -> None:
        """Tell the other ranks to stop, wait for them, leave the group."""
        import torch.distributed as dist

        with self._condition:
            self._closing = True
        try:
            for rank in self.ranks:
                with contextlib.suppress(OSError):
                    rank.batches.send(None)
        finally:
            for process in self.processes:
                process.join(timeout=60)
                if process.is_alive():
                    process.kill()
            self._monitor.join(timeout=10)
            if dist.is_initialized():
                dist.destroy_process_group()
            self.engine.close()


def describe(failed: Mapping[int, str | None]) -> str:
    """'rank 1 failed it (ValueError: ...)', for logs."""
    return "; ".join(f"rank {rank} failed it ({message})" for rank, message in sorted(failed.items()))


def exit_worker(processes: list[Any]) -> StopWorker:
    """The production StopWorker: log why, kill the other ranks, and end this process at once
    (a thread blocked in a collective cannot be joined, so a clean shutdown would hang)."""

    def stop(reason: str) -> NoReturn:
        log.critical("context parallel ranks out of step: %s; stopping the worker", reason)
        for process in processes:
            with contextlib.suppress(Exception):
                process.kill()
        logging.shutdown()
        sys.stderr.flush()
        os._exit(EXIT_OUT_OF_STEP)

    return stop


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


def follow(
    settings: WorkerSettings,
    rank: int,
    address: str,
    device: str,
    parallelize: Parallelize,
    batches: Connection,
    outcomes: Connection,
) -> None:
    """Ranks 1..K-1: load, join the group, split, then make every batch rank 0 sends and report
    how it ended, until rank 0 says stop or is gone."""
    import torch.distributed as dist

    leave_stop_signals_to_rank_0()
    die_with_rank_0()
    # Loaded before joining: a rank that cannot load exits while rank 0 waits on a pipe, not in
    # the group's rendezvous (which would wait for it for COLLECTIVE_TIMEOUT).
    engine = DiffusersEngine.load(settings, device)
    outcomes.send(LOADED)
    join_group(settings, rank, address, device)
    try:
        parallelize(engine.pipeline, settings)
        outcomes.send(READY)
        while True:
            try:
                message = batches.recv()
            except EOFError:
                break  # rank 0 is gone
            if message is None:
                break
            number, batch = message
            error = None
            try:
                engine.generate(batch)
            except Exception as exc:  # rank 0 decides what it means: sent back, not raised
                error = f"{type(exc).__name__}: {exc}"
                log.warning("rank %d, batch %d: %s", rank, number, error)
            outcomes.send((number, error))
    finally:
        dist.destroy_process_group()


def leave_stop_signals_to_rank_0() -> None:
    """Ignore SIGINT and SIGTERM in a rank. Ctrl-C, systemd and `kill -- -PGID` signal the whole
    process group: a rank that died of it was a rank exiting, and rank 0 stopped the worker (exit
    70) and dropped the requests it was draining. Rank 0 stops the ranks itself once it has drained."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def die_with_rank_0() -> None:
    """On Linux, have the kernel SIGKILL this rank when rank 0 ends (PR_SET_PDEATHSIG), best effort.

    An idle rank sees rank 0 go (its pipe closes), but one inside a collective, or hung, would hold
    its GPU for COLLECTIVE_TIMEOUT. The kernel sends the signal when the thread that started the
    rank ends: in the worker that is the model-loading thread of asyncio's executor, which lives
    until the event loop closes, after rank 0 has stopped the ranks."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            log.warning("could not ask to die with rank 0: errno %d", ctypes.get_errno())
            return
    except (OSError, AttributeError) as exc:
        log.warning("could not ask to die with rank 0: %s", exc)
        return
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # rank 0 ended before the prctl
        os._exit(EXIT_OUT_OF_STEP)


def expect(rank: Rank, message: str) -> None:
    """Block until `rank` says `message` (LOADED, READY); ModelLoadError if it exits first."""
    ready = wait([rank.outcomes, rank.process.sentinel])
    if rank.outcomes in ready:
        with contextlib.suppress(EOFError, OSError):
            if rank.outcomes.recv() == message:
                return
    rank.process.join(timeout=10)
    raise ModelLoadError(
        f"context parallel rank {rank.number} exited during start-up (status {rank.process.exitcode}); "
        "its log lines above say why"
    )


def while_ranks_live(ranks: list[Rank], doing: str, work: Callable[[], None]) -> None:
    """Run `work` (rank 0's part of a step all ranks take together) while watching the other ranks:
    ModelLoadError as soon as one exits. Rank 0 alone in the group's rendezvous, or in a collective
    of the split, waits for COLLECTIVE_TIMEOUT (an hour) for a rank that died there (an NCCL
    initialisation error, a rank killed for memory). The work runs on a daemon thread, which is
    left behind blocked when a rank dies: the worker is exiting then."""
    outcome: list[BaseException | None] = []
    thread = threading.Thread(
        target=lambda: outcome.append(_raised_by(work)), name="context-parallel-start", daemon=True
    )
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.5)
        for rank in ranks:
            if not rank.process.is_alive():
                raise ModelLoadError(
                    f"context parallel rank {rank.number} exited while the ranks were {doing} (status "
                    f"{rank.process.exitcode}); its log lines above say why"
                )
    if outcome and outcome[0] is not None:
        raise outcome[0]


def _raised_by(work: Callable[[], None]) -> BaseException | None:
    try:
        work()
    except BaseException as exc:
        return exc
    return None


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
    grace: float = OUTCOME_GRACE_SECONDS,
    stop_worker: StopWorker | None = None,
) -> ContextParallelEngine:
    """Start the other ranks, load rank 0 here meanwhile, and return rank 0's engine once all are
    ready. `stop_worker` (default: exit the process) is called when the ranks fall out of step."""
    if device_for_rank is gpu_for_rank:
        check_gpus(settings)
    address = free_address()
    spawn = multiprocessing.get_context("spawn")
    ranks: list[Rank] = []
    try:
        for number in range(1, settings.context_parallel_size):
            batches_in, batches_out = spawn.Pipe(duplex=False)
            outcomes_in, outcomes_out = spawn.Pipe(duplex=False)
            process = spawn.Process(
                target=follow,
                args=(
                    settings,
                    number,
                    address,
                    device_for_rank(number),
                    parallelize,
                    batches_in,
                    outcomes_out,
                ),
                name=f"context-parallel-rank-{number}",
                daemon=True,
            )
            process.start()
            batches_in.close()  # the child's ends: closed here so that EOF reaches whoever is left
            outcomes_out.close()
            ranks.append(Rank(number, process, batches_out, outcomes_in))
        engine = DiffusersEngine.load(settings, device_for_rank(0))
        if parallelize is enable_context_parallel:
            check_supported(engine.pipeline, settings)
        for rank in ranks:
            expect(rank, LOADED)

        def join_and_split() -> None:
            join_group(settings, 0, address, engine.device)
            parallelize(engine.pipeline, settings)

        while_ranks_live(ranks, "joining their group", join_and_split)
        for rank in ranks:
            expect(rank, READY)
    except BaseException:
        for rank in ranks:
            rank.process.kill()
        raise
    log.info(
        "context parallel: %d ranks (%s)", settings.context_parallel_size, settings.context_parallel_mode
    )
    parallel = ContextParallelEngine(
        engine, ranks, grace=max(grace, OUTCOME_GRACE_SECONDS), stop_worker=stop_worker
    )
    try:
        check_split(parallel, settings)
        if settings.compile:
            warm_up_ranks(parallel, settings)
    except BaseException:
        parallel.close()
        raise
    parallel.serve(grace, HUNG_AFTER_REQUEST_TIMEOUTS * settings.request_timeout)
    return parallel


def check_split(parallel: ContextParallelEngine, settings: WorkerSettings) -> None:
    """Make one image of WARM_UP_STEPS steps at the default size on every rank; ModelLoadError if
    it fails. Loading and splitting pass for a set-up whose sequences the ranks cannot share
    (Flux's 512 text tokens over 3 ranks), and then every request failed with a 500."""
    work = start_up_batch(parallel, settings, 1, default_guidance(parallel, settings))
    try:
        parallel.generate(work)
    except Exception as exc:
        ranks = settings.context_parallel_size
        raise ModelLoadError(
            f"--context-parallel-size {ranks} ({settings.context_parallel_mode}): a {work.width}x"
            f"{work.height} image, made at start-up to check the split, failed on the ranks "
            f"({describe_error(exc)}). diffusers splits each sequence the model's context-parallel plan "
            f"names (the image tokens, and for Flux its 512 text tokens) evenly over the ranks, so "
            f"each must be a multiple of {ranks}: choose a --context-parallel-size that divides them"
        ) from exc


def warm_up_ranks(parallel: ContextParallelEngine, settings: WorkerSettings) -> None:
    """The compile warm-up on every rank; ModelLoadError if it fails."""
    try:
        warm_up(parallel, settings)
    except Exception as exc:
        raise ModelLoadError(
            f"--compile: the warm-up on the context-parallel ranks failed ({describe_error(exc)})"
        ) from exc
