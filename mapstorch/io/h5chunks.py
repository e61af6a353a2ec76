"""Reading a block of an HDF5 dataset on several cores, outside HDF5's one-thread read path
(and writing spectra the same way: :func:`write_spectra_rows`).

XRF-Maps and the APS fly-scan writers store spectra gzip-compressed (deflate), one pixel or one
row of pixels per chunk. HDF5 reads and inflates the chunks one after another on one core,
under h5py's lock: 19 us per 2048-channel pixel with row chunks, 52 us with one-pixel chunks,
two to five times the whole fit. Here the dataset's chunk index is taken once (``chunk_iter``),
and a few threads each read their chunks' stored bytes from the file (``os.pread``, no lock;
chunks stored one after another in one read, up to 64 at a time), inflate them (libdeflate through the ``deflate`` package, 4.4 against zlib's 19 us per pixel
on one core, when it imports; else ``zlib``; both release the GIL), undo the shuffle filter and
copy their part of the selection into the result (one-spectrum chunks, XRF-Maps' own, into a
result whose spectra are contiguous: one copy each). An uncompressed contiguous dataset is read
the same way, in a few byte ranges side by side, or, for a slab of whole rows of at least 4 MiB,
memory-mapped (read-only; no copy from the page cache: its pages come in as the fit reads them,
or the fit's threads read their parts of it themselves, :func:`file_bytes`).

Anything else goes to h5py's own read, so the numbers are always h5py's: filters other than
deflate and shuffle (szip, lzf, Fletcher-32, scale-offset, plugins), chunks never written,
files not opened with HDF5's default (``sec2``) driver, systems without ``os.pread``
(Windows), selections with steps, small reads, and chunks under 4 KiB (their per-chunk Python
work would cost more than it saves).
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import threading
import weakref
import zlib

import numpy as np

from mapstorch import aligned
from mapstorch.parallel import run_chunks

try:
    import deflate as _libdeflate
except ImportError:  # pragma: no cover - a dependency; zlib does the same, slower
    _libdeflate = None

__all__ = ["file_bytes", "read_block", "read_threads", "usable_cores", "write_spectra_rows"]

_DEFLATE, _SHUFFLE = 1, 2  # HDF5 filter identifiers (H5Z_FILTER_DEFLATE, H5Z_FILTER_SHUFFLE)
_CONTIGUOUS, _CHUNKED = 1, 2  # HDF5 layouts (H5D_CONTIGUOUS, H5D_CHUNKED)
_MIN_BYTES = 1 << 20  # smaller selections: h5py's read (threads would cost more than they save)
_MIN_CHUNK_BYTES = 4 << 10  # smaller chunks: h5py's read (one 1024-channel float32 spectrum is 4 KiB)
_PIECE_BYTES = 4 << 20  # a contiguous dataset's byte range is read in pieces of about this size
# a contiguous dataset's slab of whole rows is memory-mapped, not read, from this size on: the fit
# reads it once, and copying 8 kB per 2048-channel spectrum from the page cache cost 0.8 us per
# pixel of the map fit's 7 (the copy done between chunks, both cores fitting)
_MAP_CONTIGUOUS = True
_MIN_MAP_BYTES = 4 << 20
_BATCH = 64  # chunks per work item at most (those stored one after another are read at once)

_ATTR = "_mapstorch_read_plan"  # where a dataset object keeps its _Plan (False: h5py's read)


_setting = threading.local()  # this thread's default number of reading threads (read_threads)


@contextlib.contextmanager
def read_threads(n: int | None):
    """Within the block, :func:`read_block` calls of this thread use ``n`` threads by default
    (None: every usable core), e.g. 1 in a Dask task, whose workers already share the cores."""
    old = getattr(_setting, "n", None)
    _setting.n = n
    try:
        yield
    finally:
        _setting.n = old


def usable_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


class _Plan:
    """Where a dataset's values lie in its file: ``offset`` (contiguous layout), or per chunk of
    the chunk grid ``offsets``/``sizes``/``masks`` (-1 where a chunk was never written) and the
    ``filters`` in the order they were applied; ``stamp``: the file's size and modification
    time when this was taken (a file changed since is looked at again)."""

    def __init__(self, path: str, offset: int | None = None, filters: list[int] | None = None,
                 offsets: np.ndarray | None = None, sizes: np.ndarray | None = None, masks: np.ndarray | None = None):
        self.path, self.offset, self.filters = path, offset, filters
        self.offsets, self.sizes, self.masks = offsets, sizes, masks
        self.stamp = _stamp(path)


def _stamp(path: str) -> tuple[int, int] | None:
    """The file's size and modification time (ns), or None if it cannot be looked at."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _make_plan(dset) -> _Plan | None:
    """The dataset's :class:`_Plan`, or None where this module leaves the read to h5py."""
    f = dset.file
    if f.driver != "sec2" or dset.dtype.kind not in "iuf" or dset.size == 0 or not hasattr(os, "pread"):
        return None  # (os.pread: not on Windows)
    path = os.fsdecode(f.filename)
    plist = dset.id.get_create_plist()
    layout = plist.get_layout()
    if layout == _CONTIGUOUS:
        offset = dset.id.get_offset()
        return None if offset is None or plist.get_nfilters() else _Plan(path, offset=int(offset))
    if layout != _CHUNKED or not hasattr(dset.id, "chunk_iter"):
        return None
    filters = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
    if any(flt not in (_DEFLATE, _SHUFFLE) for flt in filters):
        return None
    if int(np.prod(dset.chunks)) * dset.dtype.itemsize < _MIN_CHUNK_BYTES:
        return None
    grid = tuple(-(-n // c) for n, c in zip(dset.shape, dset.chunks))
    offsets = np.full(grid, -1, dtype=np.int64)
    sizes = np.zeros(grid, dtype=np.int64)
    masks = np.zeros(grid, dtype=np.int64)
    chunk = dset.chunks

    def visit(info) -> None:
        at = tuple(o // c for o, c in zip(info.chunk_offset, chunk))
        offsets[at], sizes[at], masks[at] = info.byte_offset, info.size, info.filter_mask

    dset.id.chunk_iter(visit)
    return _Plan(path, filters=filters, offsets=offsets, sizes=sizes, masks=masks)


def _plan(dset) -> _Plan | None:
    """:func:`_make_plan`, kept on the dataset object (so a plan never outlives the object it
    was taken from; HDF5 reuses the identifiers of closed objects) and taken again if the file
    changed since."""
    plan = getattr(dset, _ATTR, None)
    if plan is None or (plan is not False and plan.stamp != _stamp(plan.path)):
        plan = _make_plan(dset)
        try:
            setattr(dset, _ATTR, plan if plan is not None else False)
        except AttributeError:  # an object that takes no attributes: no cache
            pass
    return plan or None


def _inflate(data: bytes, size: int) -> bytes:
    """A zlib stream (what HDF5's deflate filter writes) inflated to its ``size`` bytes."""
    if _libdeflate is not None:
        return _libdeflate.zlib_decompress(data, size)
    return zlib.decompress(data)


def _decode(raw: bytes, filters: list[int], mask: int, dtype: np.dtype, shape: tuple[int, ...], size: int
            ) -> np.ndarray:
    """A chunk's values ``shape`` (``size`` bytes) from its stored bytes: the filters undone in
    reverse order (filter ``i`` skipped where bit ``i`` of ``mask`` is set, as HDF5 records for
    that chunk)."""
    data = raw
    for i in range(len(filters) - 1, -1, -1):
        if mask >> i & 1:
            continue
        if filters[i] == _DEFLATE:
            data = _inflate(data, size)
        elif dtype.itemsize > 1:  # shuffle: the bytes were grouped by their position within each value
            data = np.frombuffer(data, dtype=np.uint8).reshape(dtype.itemsize, -1).T.tobytes()
    if len(data) != size:
        raise OSError(f"a chunk holds {len(data)} bytes, {size} expected")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _pread(fd: int, size: int, offset: int) -> bytes:
    """``size`` bytes of the file at ``offset`` (an OSError if the file is shorter)."""
    data = os.pread(fd, size, offset)
    while len(data) < size:
        more = os.pread(fd, size - len(data), offset + len(data))
        if not more:
            raise OSError(f"the file ends {size - len(data)} bytes short of a block at byte {offset}")
        data += more
    return data


def _memory_order(shape: tuple[int, ...], chunk: tuple[int, ...]) -> tuple[int, ...]:
    """The axes of the result from slowest to fastest in memory: C order, except that a chunk
    spread along one axis only (XRF-Maps' one-pixel chunks: one spectrum) puts that axis last,
    so that each chunk is copied into one contiguous run."""
    long = [i for i, c in enumerate(chunk) if c > 1]
    if len(long) == 1 and len(shape) > 1:
        return tuple(i for i in range(len(shape)) if i != long[0]) + (long[0],)
    return tuple(range(len(shape)))


def read_block(dset, selection: tuple[slice, ...], n_threads: int | None = None) -> np.ndarray:
    """``dset[selection]`` (one slice per dimension) read on up to ``n_threads`` threads (default:
    :func:`read_threads`'s setting, else every usable core) where the module's fast path applies (see its docstring), with h5py
    otherwise; the same values either way. The result may be a strided view (chunks spread
    along one axis only: that axis innermost in memory). OSError for a damaged chunk."""
    if len(selection) != dset.ndim or not all(isinstance(s, slice) for s in selection):
        raise ValueError(f"read_block needs one slice per dimension of the {dset.ndim}-d dataset")
    bounds = [s.indices(n) for s, n in zip(selection, dset.shape)]
    if any(step != 1 for _, _, step in bounds):
        return dset[selection]
    starts = [a for a, _, _ in bounds]
    stops = [max(a, b) for a, b, _ in bounds]
    shape = tuple(b - a for a, b in zip(starts, stops))
    if int(np.prod(shape)) * dset.dtype.itemsize < _MIN_BYTES:
        return dset[selection]
    plan = _plan(dset)
    if plan is None:
        return dset[selection]
    if n_threads is None:
        n_threads = getattr(_setting, "n", None)
    threads = usable_cores() if n_threads is None else max(1, int(n_threads))
    if plan.offset is not None:
        if not hasattr(os, "preadv"):
            return dset[selection]
        return _read_contiguous(dset, plan, starts, stops, shape, threads, selection)
    chunk = dset.chunks
    lo = [a // c for a, c in zip(starts, chunk)]
    hi = [-(-b // c) for b, c in zip(stops, chunk)]
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    offsets, sizes, masks = plan.offsets[box], plan.sizes[box], plan.masks[box]
    if (offsets < 0).any():  # chunks never written: h5py gives their fill value
        return dset[selection]
    n_cells = offsets.size
    offsets, sizes, masks = (a.ravel().tolist() for a in (offsets, sizes, masks))  # cells in C order
    # per axis and grid index: the chunk's part inside the selection, and where it goes
    parts = [[(slice(max(g * n, a) - g * n, min(g * n + n, b) - g * n), slice(max(g * n, a) - a, min(g * n + n, b) - a))
              for g in range(g0, g1)] for n, a, b, g0, g1 in zip(chunk, starts, stops, lo, hi)]
    cells = list(itertools.product(*(range(len(p)) for p in parts)))
    order = _memory_order(shape, chunk)
    mem = aligned.empty(tuple(shape[i] for i in order), dset.dtype)  # rows on cache lines, for the SIMD kernels
    out = mem.transpose(np.argsort(order))
    dtype, filters = dset.dtype, plan.filters
    nbytes = int(np.prod(chunk)) * dtype.itemsize
    # one spectrum per chunk, the whole spectrum selected: chunk i is row i of the memory
    long = [i for i, c in enumerate(chunk) if c > 1]
    rows = None
    if len(long) == 1 and order[-1] == long[0] and starts[long[0]] == 0 and stops[long[0]] == chunk[long[0]]:
        rows = mem.reshape(n_cells, chunk[long[0]])
    batch = max(1, min(_BATCH, n_cells // (4 * threads)))  # enough work items for every thread
    fd = os.open(plan.path, os.O_RDONLY)

    def work(batches):
        for k in batches:
            i0, i1 = k * batch, min(n_cells, (k + 1) * batch)
            for i, raw in _read_chunks(fd, offsets, sizes, i0, i1):
                try:
                    values = _decode(raw, filters, masks[i], dtype, chunk, nbytes)
                except (zlib.error, getattr(_libdeflate, "DeflateError", zlib.error)) as exc:
                    origin = tuple((g + g0) * n for g, g0, n in zip(cells[i], lo, chunk))
                    raise OSError(f"chunk at {origin} cannot be inflated ({exc})") from None
                if rows is not None:
                    rows[i] = values.reshape(-1)
                else:
                    where = [p[g] for p, g in zip(parts, cells[i])]
                    out[tuple(w[1] for w in where)] = values[tuple(w[0] for w in where)]

    try:
        run_chunks(work, -(-n_cells // batch), threads, name="mapstorch-read")
    finally:
        os.close(fd)
    return out


def _read_chunks(fd: int, offsets: list[int], sizes: list[int], i0: int, i1: int):
    """Yield ``(i, stored bytes)`` of chunks ``i0 .. i1 - 1``: chunks that lie one after another
    in the file (as writers store them) in one read, others one by one."""
    i = i0
    while i < i1:
        j = i + 1
        while j < i1 and offsets[j] == offsets[j - 1] + sizes[j - 1]:
            j += 1
        span = memoryview(_pread(fd, offsets[j - 1] + sizes[j - 1] - offsets[i], offsets[i]))
        base = offsets[i]
        for n in range(i, j):
            yield n, span[offsets[n] - base:offsets[n] - base + sizes[n]]
        i = j


def _mapped(path: str, first: int, total: int, shape, dtype) -> np.ndarray | None:
    """Bytes ``first .. first + total - 1`` of the file as an array ``shape`` of ``dtype``,
    memory-mapped read-only (writing into it raises: copy it first): no copy from the page
    cache, the pages read in as they are first touched (the kernel told to read the range
    ahead), and the array's bytes are always the file's, so that a reader may take them from the
    file instead (:func:`file_bytes`). The mapping lives as long as the array or a view of it; a
    file shorter than the range is an OSError here, not a crash later. None where the file
    cannot be mapped."""
    size = os.stat(path).st_size
    if size < first + total:
        raise OSError(f"the file ends short of the dataset's byte {size - first} (of {total})")
    try:
        mm = np.memmap(path, dtype=dtype, mode="r", offset=first, shape=shape)
    except (OSError, ValueError):  # a file system that cannot map files: the caller reads it
        return None
    with contextlib.suppress(AttributeError, OSError, ValueError):  # advice only (not on every system)
        mm._mmap.madvise(mmap.MADV_WILLNEED)
    start = mm.ctypes.data
    key = id(mm)
    _LIVE_MAPS[key] = (start, start + mm.nbytes, os.path.abspath(path), first)
    weakref.finalize(mm, _LIVE_MAPS.pop, key, None)
    return np.asarray(mm)


# the blocks mapped by _mapped that are alive: id -> (first address, end address, file, its byte offset)
_LIVE_MAPS: dict[int, tuple[int, int, str, int]] = {}


def file_bytes(array: np.ndarray) -> tuple[str, int] | None:
    """``(file, byte offset)`` where the C-contiguous ``array`` lies in a file, if its memory is a
    block :func:`read_block` memory-mapped (whatever views or wrappers lead to it, a tensor's
    ``numpy()`` included); else None. A reader may then ``pread`` parts of it into memory of its
    own instead of touching the mapping: on a virtual machine each 4 kB page first touched cost
    0.3 us and its unmapping 0.12 us, more than copying it from the page cache (0.4 us)."""
    if not (isinstance(array, np.ndarray) and array.flags.c_contiguous and array.nbytes):
        return None
    lo = array.ctypes.data
    hi = lo + array.nbytes
    for first, end, path, offset in list(_LIVE_MAPS.values()):
        if first <= lo and hi <= end:
            return path, offset + (lo - first)
    return None


def _read_contiguous(dset, plan: _Plan, starts, stops, shape, threads: int, selection) -> np.ndarray:
    """A slab of whole trailing dimensions of a contiguous dataset (one byte range), in pieces
    read side by side; other selections through h5py."""
    if any(a != 0 or b != n for a, b, n in zip(starts[1:], stops[1:], dset.shape[1:])):
        return dset[selection]
    row = int(np.prod(dset.shape[1:])) * dset.dtype.itemsize
    first = plan.offset + starts[0] * row
    total = (stops[0] - starts[0]) * row
    if _MAP_CONTIGUOUS and total >= _MIN_MAP_BYTES:
        mapped = _mapped(plan.path, first, total, shape, dset.dtype)
        if mapped is not None:
            return mapped
    out = aligned.empty(shape, dset.dtype)
    view = memoryview(out.reshape(-1).view(np.uint8))
    n_pieces = max(1, min(threads * 4, -(-total // _PIECE_BYTES)))
    edges = [total * i // n_pieces for i in range(n_pieces + 1)]
    fd = os.open(plan.path, os.O_RDONLY)

    def work(items):
        for i in items:
            a, b = edges[i], edges[i + 1]
            while a < b:
                got = os.preadv(fd, [view[a:b]], first + a)
                if got <= 0:
                    raise OSError(f"the file ends short of the dataset's byte {a} (of {total})")
                a += got

    try:
        run_chunks(work, n_pieces, threads, name="mapstorch-read")
    finally:
        os.close(fd)
    return out


# ---------------------------------------------------------------------------------- writing

_WRITE_LEVEL = 2  # libdeflate's level 2: smaller files than zlib's level 4 (h5py's default), 5x faster


def _direct_writable(dset, channels: int) -> bool:
    """Whether spectra can go into ``dset`` (``[C, rows, cols]``) as chunks deflated here: chunks
    of whole spectra on one row (``(C, 1, k)``), the deflate filter alone, libdeflate and h5py's
    ``write_direct_chunk`` at hand."""
    if _libdeflate is None or dset.chunks is None or not hasattr(dset.id, "write_direct_chunk"):
        return False
    if dset.ndim != 3 or dset.chunks[:2] != (channels, 1) or dset.compression != "gzip":
        return False
    return not (dset.shuffle or dset.fletcher32 or dset.scaleoffset is not None)


def write_spectra_rows(dset, row0: int, spectra: np.ndarray, n_threads: int | None = None) -> None:
    """``dset[:, row0:row0 + r, :] = spectra`` transposed, for pixel-major ``spectra [r, cols, C]``
    into a ``[C, rows, cols]`` dataset (XRF-Maps' ``mca_arr``).

    A gzip-compressed dataset chunked ``(C, 1, k)`` (what :func:`mapstorch.io.hdf5.write_xrfmaps_h5`
    creates) gets its chunks deflated by libdeflate on ``n_threads`` threads (default: every
    usable core) and stored as they are (``write_direct_chunk``): HDF5 would deflate them one
    after another on one core with zlib, several times slower. The file reads back the same
    through any HDF5 reader (a standard zlib stream per chunk; edge chunks padded with zeros, as
    HDF5 pads them). Any other dataset is written by h5py.
    """
    r, cols, channels = spectra.shape
    if not _direct_writable(dset, channels) or dset.dtype != spectra.dtype:
        dset[:, row0:row0 + r, :] = np.transpose(spectra, (2, 0, 1))
        return
    k = dset.chunks[2]
    keys = [(i, c0) for i in range(r) for c0 in range(0, cols, k)]

    def pack(key):
        i, c0 = key
        tile = np.zeros((channels, k), dtype=dset.dtype)
        tile[:, :min(k, cols - c0)] = spectra[i, c0:c0 + k].T
        return _libdeflate.zlib_compress(tile.tobytes(), _WRITE_LEVEL)

    threads = max(1, min(n_threads or getattr(_setting, "n", None) or usable_cores(), len(keys)))
    if threads == 1:
        packed = map(pack, keys)
    else:
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(threads, thread_name_prefix="mapstorch-deflate")
        packed = pool.map(pack, keys)
    try:
        for (i, c0), data in zip(keys, packed):
            dset.id.write_direct_chunk((0, row0 + i, c0), data)
    finally:
        if threads > 1:
            pool.shutdown()
