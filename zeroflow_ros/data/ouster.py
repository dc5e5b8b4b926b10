"""Ouster pcap + sensor metadata json -> sweeps, with ``ouster-sdk`` (1.x API).

Each complete scan becomes one sweep: the pixels with a return (``RANGE > 0``) in the staggered
(measurement) order, row-major over (beams, columns); xyz in metres in the sensor frame of the
metadata (``XYZLut``: beam origins, ``lidar_to_sensor_transform``, ``sensor_to_body``); ``ring`` = the
beam (row); intensity = ``REFLECTIVITY`` (else ``SIGNAL``) as the sensor gives it; per-point time =
its column's timestamp. The sweep stamp is the first valid column's timestamp, as the Ouster ROS
driver stamps a scan; columns whose packets are missing (timestamp 0) are dropped.

Install (ouster-sdk pins ``rosbags==0.9.23``, we need ``rosbags>=0.10``; pcap reading needs only
numpy and an importable ``rosbags`` of either version): ``pip install --no-deps ouster-sdk==1.0.1``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from zeroflow_ros.data.av2 import DataError
from zeroflow_ros.data.importer import SourceSweep


def _sdk():
    try:
        from ouster.sdk import core, open_source
    except ImportError as exc:
        raise DataError(f'reading an Ouster pcap needs ouster-sdk ({exc}); install it with '
                        '`pip install --no-deps ouster-sdk==1.0.1` (it also imports rosbags)') from None
    return core, open_source


def find_metadata(pcap: Path, meta: Path | None) -> Path:
    """Return the metadata json: ``meta`` when given, else the only ``.json`` beside the pcap."""
    if meta is not None:
        if not Path(meta).is_file():
            raise DataError(f'{meta}: Ouster metadata json not found')
        return Path(meta)
    cands = sorted(Path(pcap).parent.glob('*.json'))
    if len(cands) != 1:
        raise DataError(f'{pcap}: give the sensor metadata with --meta (found {len(cands)} .json files '
                        'beside the pcap, expected exactly one)')
    return cands[0]


def iter_ouster_pcap(pcap: Path, meta: Path | None = None) -> Iterator[SourceSweep]:
    """Yield the scans of an Ouster pcap as sweeps (see the module docstring)."""
    core, open_source = _sdk()
    pcap = Path(pcap)
    if not pcap.is_file():
        raise DataError(f'{pcap}: pcap file not found')
    meta = find_metadata(pcap, meta)
    try:
        src = open_source(str(pcap), meta=[str(meta)])
        info = src.sensor_info[0]
        lut = core.XYZLut(info)
    except Exception as exc:  # the SDK raises RuntimeError/ValueError/KeyError on bad json or pcap
        raise DataError(f'{pcap}: cannot open as an Ouster pcap with metadata {meta}: '
                        f'{type(exc).__name__}: {exc}') from None
    for frames in src:
        for scan in frames:
            if scan is None:
                continue
            sweep = _scan_to_sweep(core, lut, scan)
            if sweep is not None:
                yield sweep


def _scan_to_sweep(core, lut, scan) -> SourceSweep | None:
    rng = np.asarray(scan.field(core.ChanField.RANGE))
    col_t = np.asarray(scan.timestamp, dtype=np.int64)
    col_ok = col_t > 0
    if not col_ok.any():
        return None
    valid = (rng > 0) & col_ok[None, :]
    xyz = np.asarray(lut(rng))[valid].astype(np.float32)
    names = set(scan.fields)
    inten = None
    for name in ('REFLECTIVITY', 'SIGNAL'):
        if name in names:
            inten = np.asarray(scan.field(name))[valid].astype(np.float32)
            break
    rows = np.broadcast_to(np.arange(rng.shape[0])[:, None], rng.shape)[valid]
    stamp = int(col_t[col_ok][0])
    offset = np.broadcast_to(col_t[None, :], rng.shape)[valid] - stamp
    return SourceSweep(stamp, xyz, inten, rows.astype(np.int64), offset.astype(np.int64))
