"""Shared test setup: thread limits, the shared-data location, and reference line sources."""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "2")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MAPSTORCH_SHARED_DATA", REPO.parent / "shared" / "data"))
GOLDEN = Path(__file__).resolve().parent / "golden"


def require_shared(*parts: str) -> Path:
    """Path inside ../shared/data; skip (or fail under MAPSTORCH_REQUIRE_SHARED=1) when absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        reason = f"shared test data not found: {path} (clone the project with ../shared beside it)"
        if os.environ.get("MAPSTORCH_REQUIRE_SHARED") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def xrfmaps_reference() -> Path:
    return require_shared("xrfmaps-reference")


@pytest.fixture(scope="session")
def csv_source(xrfmaps_reference: Path):
    from mapstorch.physics.lines import xrfmaps_source

    return xrfmaps_source(xrfmaps_reference / "xrf_library.csv", xrfmaps_reference / "henke.xdr")


@pytest.fixture(scope="session")
def override_2ide() -> Path:
    return require_shared("xrfmaps-2ide", "maps_fit_parameters_override.txt")
