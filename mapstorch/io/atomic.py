"""Writing files so that readers never see half of one.

Output goes to a temporary file in the target's folder and is renamed onto the final name only
when complete (``os.replace`` is atomic within a file system). A failed or interrupted write
removes its temporary file and leaves any previous file under the final name untouched.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from mapstorch.errors import InputError

__all__ = ["check_target", "temporary_beside", "atomic_path", "atomic_write_text"]


def check_target(path: str | os.PathLike[str], what: str = "output", error: type[Exception] = InputError) -> Path:
    """``path`` as a Path, after checking that it can be an output file (not a folder, folder exists)."""
    target = Path(path)
    if target.is_dir():
        raise error(f"{target} is a folder; give a file name for the {what} (e.g. {target / 'out'})")
    if not target.parent.exists():
        raise error(f"folder {target.parent} does not exist; create it first (for the {what} {target.name})")
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temporary_beside(target: Path) -> str:
    """An empty temporary file next to ``target``, with the permissions a new file would get."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    with contextlib.suppress(OSError):
        os.chmod(tmp, 0o666 & ~_umask())
    return tmp


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], what: str = "output",
                error: type[Exception] = InputError) -> Iterator[str]:
    """Yield a temporary path to write; it becomes ``path`` when the block ends without error."""
    target = check_target(path, what, error)
    tmp = temporary_beside(target)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str, what: str = "output",
                      error: type[Exception] = InputError) -> None:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically."""
    with atomic_path(path, what, error) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
