"""The chart's CRD copy (files/crds/, made by `make crds`) must match the repository's crds/."""

from __future__ import annotations

from support.chart import CHART, REPO

SOURCE = REPO / "crds"
COPY = CHART / "files" / "crds"


def test_chart_carries_every_crd_and_nothing_else() -> None:
    source = sorted(path.name for path in SOURCE.glob("*.yaml"))
    copied = sorted(path.name for path in COPY.glob("*.yaml"))
    assert source, "crds/ holds no CRD"
    assert copied == source, "the chart's CRDs differ from crds/: run `make crds`"


def test_chart_crd_copies_are_byte_identical() -> None:
    drifted = [
        path.name for path in SOURCE.glob("*.yaml") if (COPY / path.name).read_bytes() != path.read_bytes()
    ]
    assert not drifted, f"{drifted} changed in crds/ but not in {COPY.relative_to(REPO)}: run `make crds`"
