"""Context parallelism's rank fan-out on the CPU, with real processes and a real gloo group.

The attention split itself (diffusers' `enable_parallelism`) needs GPUs; here the split is
replaced by `support.rank_probe`, which all-reduces over the group in every denoiser call (see its
docstring), and can make chosen ranks fail a call before that all-reduce, leaving the others
blocked in it as a real split would. Everything else is the worker's own code: child processes
spawned, the group joined, each batch sent to every rank, images returned by rank 0, outcomes
reported back, the worker stopped when the ranks fall out of step, the ranks stopped on close.
The worker's real stop (ending the process) is replaced by a recorder in-process and checked on
its own in a subprocess.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from diffusion_worker import context_parallel
from diffusion_worker.engine import GenerationBatch, ModelLoadError, load_engines
from diffusion_worker.settings import WorkerSettings
from support import rank_probe

pytestmark = pytest.mark.integration

GRACE = 3.0


class Stops:
    """Records the worker stops asked for (the real one ends the process)."""

    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.asked = threading.Event()

    def __call__(self, reason: str) -> None:
        self.reasons.append(reason)
        self.asked.set()


def start_failing(
    tiny_model_dir: Path, stops: Stops, rows: int, ranks: tuple[int, ...], grace: float = GRACE
) -> context_parallel.ContextParallelEngine:
    """Two CPU ranks whose denoiser call of `rows` rows fails on `ranks`. A test that does not wait
    for the grace time to pass gives a long one: on a loaded machine a rank may end a batch that
    both made more than GRACE seconds after the other."""
    return context_parallel.start(
        WorkerSettings(model=str(tiny_model_dir), context_parallel_size=2),
        device_for_rank=lambda rank: "cpu",
        parallelize=functools.partial(rank_probe.fail_on_rows, rows, ranks),
        grace=grace,
        stop_worker=stops,
    )


def kill_and_close(engine: context_parallel.ContextParallelEngine) -> None:
    for process in engine.processes:
        process.kill()
        process.join(30)
    engine.close()


def batch(prompts: list[str], seeds: list[int], steps: int) -> GenerationBatch:
    return GenerationBatch(
        prompts=prompts,
        negative_prompts=None,
        width=64,
        height=64,
        num_inference_steps=steps,
        guidance_scale=7.5,
        seeds=seeds,
    )


@pytest.mark.timeout(600)
def test_every_rank_makes_every_batch_and_rank_0_returns_the_images(tiny_model_dir: Path) -> None:
    settings = WorkerSettings(model=str(tiny_model_dir), context_parallel_size=2)
    (single,) = load_engines(WorkerSettings(model=str(tiny_model_dir)))
    first, second = batch(["a red circle"], [3], 2), batch(["a cat", "a dog", "a cow"], [4, 5, 6], 3)
    engine = context_parallel.start(
        settings, device_for_rank=lambda rank: "cpu", parallelize=rank_probe.all_reduce_each_denoiser_call
    )
    rank_probe.SUMS.clear()  # start-up's own call (check_split) is not counted
    try:
        assert engine.info.supports_step_callback is False
        images = engine.generate(first) + engine.generate(second)
    finally:
        engine.close()
    assert all(not process.is_alive() for process in engine.processes)
    assert all(process.exitcode == 0 for process in engine.processes)
    # 2 + 3 denoiser calls; in each, both ranks had the same batch (2 and 6 rows with guidance).
    assert [(round(rows, 6), round(step, 6)) for rows, step in rank_probe.SUMS] == [(2.0, 2.0)] * 5
    expected = single.generate(first) + single.generate(second)
    for ours, reference in zip(images, expected, strict=True):
        assert np.array_equal(np.asarray(ours), np.asarray(reference))


@pytest.mark.timeout(300)
def test_a_rank_whose_gpu_fails_fails_start_up_at_once(tiny_model_dir: Path) -> None:
    """Rank 1 is given cuda:63, which no machine here has, so it fails as soon as it touches its
    device. Ranks load before they join the group, so rank 0 hears of it on its pipe; when ranks
    joined first, rank 1 died before the rendezvous and rank 0 waited in it for the collective
    timeout (an hour)."""
    settings = WorkerSettings(model=str(tiny_model_dir), context_parallel_size=2)
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match=r"context parallel rank 1 exited during start-up \(status 1\)"):
        context_parallel.start(
            settings,
            device_for_rank=lambda rank: "cpu" if rank == 0 else "cuda:63",
            parallelize=rank_probe.all_reduce_each_denoiser_call,
        )
    assert time.monotonic() - started < 120


DIES_JOINING = """
import sys
sys.path.insert(0, sys.argv[2])
from diffusion_worker import context_parallel
from diffusion_worker.engine import ModelLoadError
from diffusion_worker.settings import WorkerSettings
from support import rank_dies_joining

if __name__ == "__main__":
    settings = WorkerSettings(model=sys.argv[1], context_parallel_size=2)
    try:
        context_parallel.start(
            settings, device_for_rank=lambda rank: "cpu", parallelize=rank_dies_joining.parallelize
        )
    except ModelLoadError as exc:
        print(f"ModelLoadError: {exc}")
"""


@pytest.mark.timeout(300)
def test_a_rank_that_dies_while_the_ranks_join_their_group_fails_start_up_at_once(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Rank 1 loads, says so, and dies joining the group (support.rank_dies_joining). Rank 0 sat in
    the rendezvous waiting for it for the collective timeout (an hour). In a process of its own:
    rank 0's join is left blocked on a daemon thread, which only the process's exit ends (as in
    the worker, which exits on this error)."""
    script = tmp_path / "dies_joining.py"
    script.write_text(DIES_JOINING)
    tests = Path(__file__).resolve().parents[2]
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(script), str(tiny_model_dir), str(tests)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert (
        "ModelLoadError: context parallel rank 1 exited while the ranks were joining their group (status 3)"
        in (result.stdout)
    ), result.stdout + result.stderr
    assert time.monotonic() - started < 120


def test_a_unet_model_is_refused_before_any_rank_starts(tiny_model_dir: Path) -> None:
    """The real split's checks, on the tiny SD pipeline (a UNet: no context-parallel plan)."""
    (engine,) = load_engines(WorkerSettings(model=str(tiny_model_dir)))
    settings = WorkerSettings(model=str(tiny_model_dir), context_parallel_size=2)
    with pytest.raises(ModelLoadError, match="UNet2DConditionModel does not support context parallelism"):
        context_parallel.check_supported(engine.pipeline, settings)


def test_context_parallel_needs_one_gpu_per_rank() -> None:
    with pytest.raises(
        ModelLoadError, match="--context-parallel-size 2 needs 2 GPUs, one per rank; 0 visible"
    ):
        load_engines(WorkerSettings(model="builtin:tiny-sd", context_parallel_size=2))


def test_context_and_data_parallel_together_are_refused() -> None:
    with pytest.raises(ValidationError, match="cannot both be above 1"):
        WorkerSettings(model="builtin:tiny-sd", context_parallel_size=2, data_parallel_size=2)


@pytest.mark.timeout(600)
def test_a_batch_every_rank_fails_fails_alone_and_a_rank_that_exits_stops_the_worker(
    tiny_model_dir: Path,
) -> None:
    (single,) = load_engines(WorkerSettings(model=str(tiny_model_dir)))
    stops = Stops()
    engine = start_failing(
        tiny_model_dir, stops, rows=8, ranks=(0, 1), grace=context_parallel.OUTCOME_GRACE_SECONDS
    )
    try:
        with pytest.raises(ValueError, match="rank 0 refuses 8 rows"):
            engine.generate(batch(["a", "b", "c", "d"], [1, 2, 3, 4], 2))  # 8 rows with guidance
        after = batch(["a red circle"], [3], 2)
        assert np.array_equal(np.asarray(engine.generate(after)[0]), np.asarray(single.generate(after)[0]))
        assert stops.reasons == [], "a failure on every rank leaves them in step"
        engine.processes[0].kill()
        assert stops.asked.wait(10)
        assert stops.reasons == ["rank 1 exited (status -9)"]
        with pytest.raises(context_parallel.RanksOutOfStepError, match="rank 1 exited"):
            engine.generate(after)
    finally:
        kill_and_close(engine)


def generate_in_thread(
    engine: context_parallel.ContextParallelEngine, work: GenerationBatch
) -> tuple[threading.Thread, dict[str, Any]]:
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["images"] = engine.generate(work)
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("failing_rank", "expected"),
    [
        (
            1,
            "rank 0 still in batch 2 3s after rank 1 failed it (ValueError: rank 1 refuses 4 rows); "
            "it is blocked in a collective",
        ),
        (
            0,
            "rank(s) [1] still in batch 2 3s after rank 0 failed: rank 0 refuses 4 rows; "
            "they are blocked in a collective",
        ),
    ],
)
def test_a_batch_one_rank_fails_stops_the_worker_within_the_grace_time(
    tiny_model_dir: Path, failing_rank: int, expected: str
) -> None:
    stops = Stops()
    # 4 rows: two images with guidance (start-up's own call, batch 1, makes one: 2 rows).
    engine = start_failing(tiny_model_dir, stops, rows=4, ranks=(failing_rank,))
    try:
        started = time.monotonic()
        thread, outcome = generate_in_thread(engine, batch(["a red circle", "a cat"], [3, 4], 2))
        assert stops.asked.wait(GRACE + 30)
        waited = time.monotonic() - started
        assert stops.reasons == [expected]
        assert GRACE <= waited < GRACE + 30
    finally:
        kill_and_close(engine)  # a blocked collective ends once its peer is gone
    thread.join(30)
    assert not thread.is_alive()
    assert isinstance(outcome.get("error"), context_parallel.RanksOutOfStepError)


def test_the_real_stop_logs_the_reason_and_ends_the_process_with_status_70() -> None:
    code = (
        "import logging; logging.basicConfig();"
        "from diffusion_worker.context_parallel import exit_worker;"
        "exit_worker([])('rank 1 exited (status -9)'); print('still here')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == context_parallel.EXIT_OUT_OF_STEP == 70
    assert (
        "context parallel ranks out of step: rank 1 exited (status -9); stopping the worker" in result.stderr
    )
    assert "still here" not in result.stdout


def rank_children() -> list[Any]:
    """The context-parallel ranks this process started that are still running."""
    return [p for p in multiprocessing.active_children() if p.name.startswith("context-parallel-rank")]


@pytest.mark.timeout(300)
def test_a_rank_that_hangs_without_exiting_stops_the_worker(tiny_model_dir: Path) -> None:
    """Rank 1 is stopped (SIGSTOP), as a wedged GPU or driver call leaves a rank: it neither exits
    nor reports, and rank 0 waits for it in a collective. The batch is taken for hung once it has
    run twice --request-timeout. Before, nothing noticed for the collective timeout (an hour):
    requests got 504 and /health answered 200."""
    stops = Stops()
    engine = context_parallel.start(
        WorkerSettings(model=str(tiny_model_dir), context_parallel_size=2, request_timeout=10),
        device_for_rank=lambda rank: "cpu",
        parallelize=rank_probe.all_reduce_each_denoiser_call,
        stop_worker=stops,
    )
    try:
        engine.generate(batch(["a red circle"], [3], 2))
        os.kill(engine.processes[0].pid, signal.SIGSTOP)
        thread, outcome = generate_in_thread(engine, batch(["a cat"], [4], 2))
        assert stops.asked.wait(120), "the hung batch was never noticed"
        [reason] = stops.reasons
        assert reason.startswith("batch 3 has run ")
        assert reason.endswith("(2x --request-timeout), and rank(s) [0, 1] have not ended it; a rank is hung")
    finally:
        kill_and_close(engine)  # SIGKILL ends a stopped process too
    thread.join(30)
    assert isinstance(outcome.get("error"), context_parallel.RanksOutOfStepError)


@pytest.mark.timeout(300)
def test_ranks_leave_stop_signals_to_rank_0(tiny_model_dir: Path) -> None:
    """Ctrl-C, systemd and `kill -- -PGID` signal the whole process group, ranks included. Rank 0
    drains and then stops the ranks itself; before, rank 1 died of the signal, and rank 0 stopped
    the worker (exit 70), dropping the requests it was draining."""
    stops = Stops()
    engine = context_parallel.start(
        WorkerSettings(model=str(tiny_model_dir), context_parallel_size=2),
        device_for_rank=lambda rank: "cpu",
        parallelize=rank_probe.all_reduce_each_denoiser_call,
        stop_worker=stops,
    )
    try:
        for signum in (signal.SIGTERM, signal.SIGINT):
            os.kill(engine.processes[0].pid, signum)
        assert len(engine.generate(batch(["a red circle"], [3], 2))) == 1
        assert engine.processes[0].is_alive()
        assert stops.reasons == []
    finally:
        engine.close()
    assert engine.processes[0].exitcode == 0


ORPHANED = """
import os
import signal
import sys
sys.path.insert(0, sys.argv[2])
from diffusion_worker import context_parallel
from diffusion_worker.settings import WorkerSettings
from support import rank_probe

if __name__ == "__main__":
    engine = context_parallel.start(
        WorkerSettings(model=sys.argv[1], context_parallel_size=2),
        device_for_rank=lambda rank: "cpu",
        parallelize=rank_probe.all_reduce_each_denoiser_call,
    )
    rank = engine.processes[0].pid
    os.kill(rank, signal.SIGSTOP)
    print(rank, flush=True)
    os._exit(0)
"""


def gone(pid: int) -> bool:
    """No such process, or only its zombie (dead, not yet reaped by whoever adopted it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.timeout(300)
def test_a_rank_does_not_outlive_rank_0(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Rank 0 ends at once (os._exit, as when it is killed) while rank 1 is stopped (SIGSTOP),
    standing in for a rank blocked in a collective, which never reads the closed pipe that tells
    an idle rank rank 0 is gone. The kernel kills it (PR_SET_PDEATHSIG); before, it stayed on,
    holding its GPU."""
    script = tmp_path / "orphaned.py"
    script.write_text(ORPHANED)
    tests = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, str(script), str(tiny_model_dir), str(tests)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rank = int(result.stdout.split()[-1])
    try:
        for _ in range(600):
            if gone(rank):
                break
            time.sleep(0.1)
        assert gone(rank), f"rank 1 (pid {rank}) outlived rank 0"
    finally:
        if not gone(rank):
            os.kill(rank, signal.SIGKILL)


@pytest.mark.timeout(300)
def test_a_compile_warm_up_that_fails_stops_the_ranks_and_fails_start_up(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The warm-up's four-image batch (8 rows with guidance) fails on every rank. torch.compile
    itself is switched off (TORCH_COMPILE_DISABLE for the ranks, which read it at import; dynamo's
    own patch for this process, undone after, as later tests compile): compiling takes minutes on
    a CPU, and what is tested is start-up's handling of the failure. Before, the error left
    start() as it came, and the ranks were left running."""
    import torch._dynamo

    monkeypatch.setenv("TORCH_COMPILE_DISABLE", "1")
    stops = Stops()
    with (
        torch._dynamo.config.patch(disable=True),
        pytest.raises(
            ModelLoadError,
            match=r"--compile: the warm-up on the context-parallel ranks failed "
            r"\(ValueError: rank 0 refuses 8 rows\)",
        ),
    ):
        context_parallel.start(
            WorkerSettings(model=str(tiny_model_dir), context_parallel_size=2, compile=True),
            device_for_rank=lambda rank: "cpu",
            parallelize=functools.partial(rank_probe.fail_on_rows, 8, (0, 1)),
            stop_worker=stops,
        )
    assert rank_children() == []
    assert stops.reasons == []


@pytest.mark.timeout(300)
def test_a_set_up_whose_start_up_call_fails_on_every_rank_is_refused_before_serving(
    tiny_model_dir: Path,
) -> None:
    """Start-up's own call (one image at the default size, 2 rows with guidance) fails on every
    rank, as diffusers' split does when the ranks cannot share a sequence (stood in here by
    rank_probe.fail_on_rows: the real case, Flux's 512 text tokens over 3 ring ranks, needs Flux).
    Before, start-up passed and every request failed."""
    stops = Stops()
    with pytest.raises(ModelLoadError, match=r"made at start-up to check the split, failed on the ranks"):
        start_failing(tiny_model_dir, stops, rows=2, ranks=(0, 1))
    assert rank_children() == []
    assert stops.reasons == []
