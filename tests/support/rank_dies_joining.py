"""A context-parallel rank that dies while the ranks join their group, for the CPU test.

Emulated instead of real: on GPUs a rank dies there from an NCCL initialisation error or an OOM
kill, neither of which a CPU rank can meet. Imported in a spawned rank (the `Parallelize` hook
below is pickled by reference, so the rank imports this module), it replaces that rank's
`join_group` with one that ends the process; in the test process it changes nothing.
"""

from __future__ import annotations

import multiprocessing
import os
from typing import Any

from diffusion_worker import context_parallel

if multiprocessing.current_process().name != "MainProcess":

    def _die_joining(settings: Any, rank: int, address: str, device: str) -> None:
        os._exit(3)

    context_parallel.join_group = _die_joining


def parallelize(pipeline: Any, settings: Any) -> None:
    """The `Parallelize` hook: no split (the rank never gets this far)."""
