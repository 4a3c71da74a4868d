"""bench/gpu.py end to end on the CPU (its `--rehearse` mode): shrunk SD 1.5 built and saved with
`save_pretrained`, the raw diffusers loop, then a real worker subprocess over HTTP. The GPU run
uses this same code path; what this checks is that it produces a result file whose correctness
section compares the worker's image with the raw one for the same seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from support.bench_scripts import load_bench_script

pytestmark = pytest.mark.integration


def test_rehearsal_writes_a_result_where_the_worker_image_equals_the_raw_image(tmp_path: Path) -> None:
    module = load_bench_script("gpu")
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
    split = worker["single_stream"]["where_time_went"]
    assert split["pipeline_call_s"] > 0 and split["encode_s"] > 0 and split["other_s"] > 0, split
    assert worker["concurrency_8"]["images_per_s"] > 0
    assert record["png_encode"]["worker_ms"] > 0 and record["png_encode"]["worker_threads"] >= 1
