"""Reading input files with one clear error for each way it can fail."""

from __future__ import annotations

import os
from pathlib import Path

from mapstorch.io.dataset import DataFileError

__all__ = ["read_bytes"]


def read_bytes(path: str | os.PathLike[str], what: str = "data file", limit: int | None = None,
               error: type[Exception] = DataFileError) -> bytes:
    """The bytes of ``path`` (the first ``limit`` only, if given); ``error`` naming ``what`` when
    it is missing, a folder or unreadable."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            return fh.read() if limit is None else fh.read(limit)
    except FileNotFoundError:
        raise error(f"{what} not found: {p}") from None
    except IsADirectoryError:
        raise error(f"{p} is a folder; give the path of the {what}") from None
    except OSError as exc:
        raise error(f"cannot read {p}: {exc.strerror or exc}") from None
