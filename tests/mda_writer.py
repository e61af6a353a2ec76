"""A small EPICS MDA encoder for tests: builds files of any rank from MdaScan trees.

Written from the sscan "MDA file format" description (XDR, big-endian; shorts take 4 bytes;
strings are a length and an XDR string), independently of the reader under test.
"""

from __future__ import annotations

import struct

import numpy as np

from mapstorch.io.mda import MdaScan


def _i(v: int) -> bytes:
    return struct.pack(">i", v)


def _s(text: str) -> bytes:
    raw = text.encode("latin-1")
    if not raw:
        return _i(0)
    return _i(len(raw)) + _i(len(raw)) + raw + b"\0" * (-len(raw) % 4)


def _scan(scan: MdaScan, start: int) -> bytes:
    head = [_i(scan.rank), _i(scan.requested_points), _i(scan.last_point)]
    body = [_s(scan.name), _s(scan.time_stamp), _i(len(scan.positioners)), _i(len(scan.detectors)),
            _i(len(scan.triggers))]
    for p in scan.positioners:
        body += [_i(p.number)] + [_s(t) for t in (p.name, p.description, p.step_mode, p.unit, p.readback_name,
                                                  p.readback_description, p.readback_unit)]
    for d in scan.detectors:
        body += [_i(d.number), _s(d.name), _s(d.description), _s(d.unit)]
    for number, name, command in scan.triggers:
        body += [_i(number), _s(name), struct.pack(">f", command)]
    body += [np.asarray(p.data, ">f8").tobytes() for p in scan.positioners]
    body += [np.asarray(d.data, ">f4").tobytes() for d in scan.detectors]
    n_offsets = scan.requested_points if scan.rank > 1 else 0
    pos = start + sum(map(len, head)) + 4 * n_offsets + sum(map(len, body))
    offsets, children = [], []
    for sub in scan.sub_scans[:n_offsets]:
        if sub is None:
            offsets.append(0)
            continue
        blob = _scan(sub, pos)
        offsets.append(pos)
        children.append(blob)
        pos += len(blob)
    offsets += [0] * (n_offsets - len(offsets))
    return b"".join(head) + b"".join(_i(o) for o in offsets) + b"".join(body) + b"".join(children)


def _extra(pvs: dict[str, dict]) -> bytes:
    out = [_i(len(pvs))]
    for name, pv in pvs.items():
        out += [_s(name), _s(pv.get("description", "")), _i(pv["type"])]
        if pv["type"] == 0:
            out.append(_s(str(pv["value"])))
            continue
        values = np.atleast_1d(pv["value"])
        out += [_i(len(values)), _s(pv.get("unit", ""))]
        dtype = {29: ">i4", 30: ">f4", 32: ">i4", 33: ">i4", 34: ">f8"}[pv["type"]]
        out.append(np.asarray(values, dtype).tobytes())
    return b"".join(out)


def write_mda(path, scan: MdaScan, dims: list[int], extra_pvs: dict[str, dict] | None = None,
              number: int = 1) -> None:
    header_len = 4 + 4 + 4 + 4 * len(dims) + 4 + 4
    body = _scan(scan, header_len)
    extra = _extra(extra_pvs or {})
    header = (struct.pack(">f", 1.3) + _i(number) + _i(scan.rank) + b"".join(_i(d) for d in dims) + _i(1)
              + _i(header_len + len(body) if extra_pvs else 0))
    with open(path, "wb") as fh:
        fh.write(header + body + (extra if extra_pvs else b""))
