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


# ----------------------------------------------------------------------------- web apps in a browser
ARTIFACTS = REPO / "test-artifacts"


def _chromium() -> str | None:
    import shutil

    for name in (os.environ.get("MAPSTORCH_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and (shutil.which(name) or Path(name).exists()):
            return shutil.which(name) or name
    return None


def _require_browser() -> str:
    """The Chromium binary and Playwright; skip (or fail under MAPSTORCH_REQUIRE_BROWSER=1)."""
    reason = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        reason = "Playwright is not installed (pip install playwright; the dev extra has it)"
    chromium = _chromium()
    if chromium is None and reason is None:
        reason = "no Chromium found (apt install chromium, or set MAPSTORCH_CHROMIUM)"
    if reason:
        if os.environ.get("MAPSTORCH_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return chromium


@pytest.fixture(scope="session")
def browser():
    """A headless Chromium driven by Playwright (Debian's chromium, no browser download)."""
    chromium = _require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def serve_app(tmp_path):
    """``serve_app(name, file)`` starts ``mapstorch app NAME FILE`` on a free port of 127.0.0.1 and
    returns its address; the server is stopped after the test."""
    import subprocess
    import sys
    import time
    import urllib.request

    procs = []

    def start(name: str, file=None) -> str:
        port = _free_port()
        cmd = [sys.executable, "-m", "mapstorch", "app", name, "--port", str(port), "--no-browser"]
        if file is not None:
            cmd.insert(5, str(file))
        log = open(tmp_path / f"app-{name}.log", "w")
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True), log))
        url = f"http://127.0.0.1:{port}/"
        t0 = time.monotonic()
        while time.monotonic() - t0 < 60:
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return url
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"the {name} app did not start: {(tmp_path / f'app-{name}.log').read_text()[-2000:]}")

    yield start
    import signal

    for proc, log in procs:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def screenshot(page, name: str) -> Path:
    """Save a screenshot of ``page`` as ``test-artifacts/apps/<name>.png``."""
    out = ARTIFACTS / "apps"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


@pytest.fixture(scope="session")
def demo_scan(tmp_path_factory) -> Path:
    """A simulated 16 x 16 map (XRF-Maps HDF5) with its override file beside it."""
    from mapstorch.synthetic import simulate_map, write_map_file

    folder = tmp_path_factory.mktemp("demo-scan")
    return write_map_file(folder / "demo_map.h5", simulate_map(16, 16, seed=0))


def load_app(name: str):
    """The marimo ``App`` object of web app ``name`` (to run its cells without a browser)."""
    import importlib.util

    from mapstorch.apps import app_path

    spec = importlib.util.spec_from_file_location(f"mapstorch_app_{name}", app_path(name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.app
