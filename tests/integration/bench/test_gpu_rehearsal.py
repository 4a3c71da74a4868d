"""bench/gpu.py end to end on the CPU (its `--rehearse` mode): shrunk SD 1.5 built and saved with
`save_pretrained`, the raw diffusers loop, then a real worker subprocess over HTTP. The GPU run
uses this same code path; what this checks is that it produces a result file whose correctness
section compares the worker's image with the raw one for the same seed."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

GPU_SCRIPT = Path(__file__).resolve().parents[3] / "bench" / "gpu.py"


def test_rehearsal_writes_a_result_where_the_worker_image_equals_the_raw_image(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_gpu_rehearsal", GPU_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    status = module.main(
        [
            "--rehearse",
            "--model",
            "sd15",
            "--modes",
            "eager",
            "--runs",
            "1",
            "--out",
            str(tmp_path / "out"),
            "--models-dir",
            str(tmp_path / "models"),
        ]
    )
    assert status == 0
    (result_file,) = (tmp_path / "out").glob("gpu-rehearsal-cpu-*.json")
    record = json.loads(result_file.read_text())["models"]["sd15"]
    assert record["correctness"]["passed"] is True
    assert record["correctness"]["worker_eager_vs_raw_eager"]["max_abs_diff"] == 0
    worker = record["phases"]["worker_eager"]
    assert worker["single_stream"]["s_per_image"]["median"] > 0
    assert worker["concurrency_8"]["images_per_s"] > 0
