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


def damaged_copy(data, original: bytes, path: Path, hot: int | None = None, max_flips: int = 8) -> Path:
    """Write ``original`` to ``path`` with random bit flips (drawn from hypothesis ``data``; half of
    them within the first ``hot`` bytes, where headers live, when given) and a random truncation."""
    from hypothesis import strategies as st

    buf = bytearray(original)
    anywhere = st.integers(0, len(buf) - 1)
    where = anywhere | st.integers(0, min(hot, len(buf)) - 1) if hot else anywhere
    for _ in range(data.draw(st.integers(0, max_flips))):
        buf[data.draw(where)] ^= 1 << data.draw(st.integers(0, 7))
    keep = data.draw(st.sampled_from([len(buf), data.draw(st.integers(0, len(buf)))]))
    path.write_bytes(bytes(buf[:keep]))
    return path


def read_or_clear_error(path: Path, *readers, seconds: float = 5.0) -> None:
    """Each reader either reads ``path`` completely or raises a MapstorchError, within ``seconds``.

    A reader returning a Dataset has all its spectra read and summarised, then closed."""
    import time

    from mapstorch.errors import MapstorchError
    from mapstorch.io.dataset import Dataset

    t0 = time.perf_counter()
    for read in readers:
        try:
            out = read(path)
            if isinstance(out, Dataset):
                with out:
                    out.read()
                    out.summary()
        except MapstorchError:
            pass
    assert time.perf_counter() - t0 < seconds
