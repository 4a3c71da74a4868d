"""Wrappers around the real tiny-model engine that let a test control or observe it.

None of them fakes generation: images still come from the real diffusers pipeline. A gate makes
"a batch is running" a state the test holds instead of a race it hopes to win; a recorder keeps
what each pipeline call was asked to do.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any, NoReturn

from diffusion_worker.engine import (
    DiffusersEngine,
    Engine,
    GenerationBatch,
    GenerationCancelledError,
    KeepGoing,
    load_engines,
)
from diffusion_worker.previews import PreviewPlan
from diffusion_worker.settings import WorkerSettings


class ObservedEngine:
    """The real engine, optionally held at a gate before each call, recording every call.

    `fail_next` makes the next call raise the given error instead of running the pipeline.
    """

    def __init__(self, inner: Engine, *, gated: bool) -> None:
        self.inner = inner
        self.info = inner.info
        self.device = inner.device
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        self.entered = threading.Event()
        self.batches: list[GenerationBatch] = []
        self.cancelled_calls = 0
        self.steps_run: list[int] = []
        self.fail_next: BaseException | None = None

    def generate(
        self, batch: GenerationBatch, keep_going: KeepGoing | None = None, previews: PreviewPlan | None = None
    ) -> list[Any]:
        self.batches.append(batch)
        self.entered.set()
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
        assert self.gate.wait(timeout=60), "the test never opened the gate"
        steps = 0

        def counting_keep_going() -> bool:
            nonlocal steps
            steps += 1
            return keep_going() if keep_going is not None else True

        try:
            return self.inner.generate(batch, counting_keep_going, previews)
        except GenerationCancelledError:
            self.cancelled_calls += 1
            raise
        finally:
            self.steps_run.append(steps)

    def close(self) -> None:
        self.gate.set()
        self.inner.close()


def observed_loader(holder: list[ObservedEngine], *, gated: bool) -> Callable[[WorkerSettings], list[Engine]]:
    """An engine loader for build_app that loads the real engines and wraps them."""

    def load(settings: WorkerSettings) -> list[Engine]:
        engines = [ObservedEngine(engine, gated=gated) for engine in load_engines(settings)]
        holder.extend(engines)
        return list(engines)

    return load


class RaisesWhen:
    """Stands in for an engine's pipeline: a call for which `raises(kwargs)` is true raises
    ValueError, as a pipeline does for an input it cannot take that validation let through (no such
    input of the tiny model is known, so the test names one); every other call is the real
    pipeline's."""

    def __init__(self, engine: DiffusersEngine, raises: Callable[[dict[str, Any]], bool]) -> None:
        self.real = engine.pipeline
        self.raises = raises
        engine.pipeline = self

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def __call__(self, **kwargs: Any) -> Any:
        if self.raises(kwargs):
            raise ValueError("the pipeline cannot take this input")
        return self.real(**kwargs)


class OutOfMemoryWhen:
    """Stands in for an engine's pipeline: a call for which `runs_out(kwargs)` is true runs out of
    device memory, either at once or (with `at_step`) after the real pipeline has run that many
    steps; every other call is the real pipeline's. A CPU cannot produce a real CUDA out-of-memory
    error, so this raises `torch.cuda.OutOfMemoryError` itself, from a frame holding an
    activation-sized tensor, and keeps only a weak reference to that tensor: `leaked()` tells
    whether anything still holds it. `restore()` puts the real pipeline back."""

    def __init__(
        self,
        engine: DiffusersEngine,
        runs_out: Callable[[dict[str, Any]], bool],
        *,
        at_step: int | None = None,
        activation_elements: int = 4 * 1024 * 1024,
    ) -> None:
        self.engine = engine
        self.real = engine.pipeline
        self.runs_out = runs_out
        self.at_step = at_step
        self.activation_elements = activation_elements
        self.activations: weakref.ref[Any] | None = None
        self.failures = 0
        engine.pipeline = self

    @classmethod
    def once(cls, engine: DiffusersEngine, **kwargs: Any) -> OutOfMemoryWhen:
        """The next call runs out of memory, later ones do not."""
        calls = iter([True])
        return cls(engine, lambda _: next(calls, False), **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def __call__(self, **kwargs: Any) -> Any:
        if not self.runs_out(kwargs):
            return self.real(**kwargs)
        if self.at_step is None:
            self._raise()
        callback = kwargs["callback_on_step_end"]

        def run_out_at_step(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> Any:
            result = callback(pipe, step, timestep, tensors)
            if step + 1 == self.at_step:
                self._raise()
            return result

        return self.real(**{**kwargs, "callback_on_step_end": run_out_at_step})

    def _raise(self) -> NoReturn:
        import torch

        self.failures += 1
        activations = torch.ones(self.activation_elements)
        self.activations = weakref.ref(activations)
        raise torch.cuda.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.15 GiB total capacity)"
        )

    def restore(self) -> None:
        self.engine.pipeline = self.real

    def leaked(self) -> bool:
        """True while the tensor the last failed call allocated is still alive."""
        return self.activations is not None and self.activations() is not None
