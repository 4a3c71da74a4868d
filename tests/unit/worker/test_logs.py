"""The worker's log set-up: one format and level for every library, and no prompt text."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from diffusion_worker.logs import configure_logging

LIBRARY_LOGGERS = ("diffusers", "transformers", "uvicorn", "uvicorn.error", "uvicorn.access")


@contextmanager
def worker_logging(level: str) -> Iterator[None]:
    """configure_logging(level), then back to how logging was: it changes process-wide loggers.
    The libraries' own handlers hold the stderr of when they were made (pytest's, at collection):
    pointed at this test's, what they print is captured like the rest."""
    # Both add their own handler when first imported.
    import diffusers.utils.logging  # noqa: F401
    import transformers.utils.logging  # noqa: F401

    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in LIBRARY_LOGGERS)]
    saved = [(logger, logger.handlers[:], logger.propagate, logger.level) for logger in loggers]
    streams = [
        (handler, handler.setStream(sys.stderr))
        for name in ("diffusers", "transformers")
        for handler in logging.getLogger(name).handlers
        if type(handler) is logging.StreamHandler
    ]
    try:
        configure_logging(level)
        yield
    finally:
        for handler, stream in streams:
            handler.setStream(stream)
        for logger, handlers, propagate, level_before in saved:
            logger.handlers[:] = handlers
            logger.propagate = propagate
            logger.setLevel(level_before)


def test_a_prompt_cut_by_the_text_encoder_stays_out_of_the_log(
    tiny_model_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Before, diffusers' own handler printed the cut-off end of the user's prompt to stderr, outside
    the worker's log format (no request id) and --log-level."""
    from diffusers import StableDiffusionPipeline

    with worker_logging("info"):
        pipeline = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
        pipeline.set_progress_bar_config(disable=True)
        pipeline("a lighthouse " + " ".join(["marmalade"] * 40), num_inference_steps=1)  # over 77 tokens
    lines = capfd.readouterr().err.splitlines()
    assert not [line for line in lines if "marmalade" in line]
    notices = [line for line in lines if "prompt was cut" in line]
    assert len(notices) == 1 and " WARNING diffusers.pipelines." in notices[0] and " [-] " in notices[0]


@pytest.mark.parametrize("library", ["diffusers", "transformers"])
def test_library_warnings_follow_the_log_level(library: str, capfd: pytest.CaptureFixture[str]) -> None:
    with worker_logging("error"):
        logging.getLogger(f"{library}.models").warning("below --log-level")
        logging.getLogger(f"{library}.models").error("at --log-level")
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].endswith(f"ERROR {library}.models [-] at --log-level"), lines
