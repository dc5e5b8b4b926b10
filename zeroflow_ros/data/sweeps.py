"""Readers for folders of lidar sweeps without the AV2 layout: KITTI ``.bin`` and PCD files, plus pose files.

* KITTI velodyne ``.bin``: little-endian float32 rows ``x, y, z, reflectance``.
* PCD v0.7 (PCL): ``DATA ascii``, ``binary`` (interleaved records) and ``binary_compressed``
  (one LZF block holding the fields column by column), decoded by ``pypcd4`` (liblzf through
  ``python-neo-lzf``); the header is checked here first so that bad or truncated files name what is
  wrong. Any ``FIELDS``/``SIZE``/``TYPE``/``COUNT``; fields with ``COUNT > 1`` come back as
  (N, count) arrays; padding fields named ``_`` are dropped.
* Pose files, KITTI style: one row-major 3x4 ``[R|t]`` per line (12 numbers), optionally preceded
  by a name (``<name> r11 ... t3``, as in the PJLab sample). Poses map sweep points into the world.

Sweep times: integer file names of 16+ digits are taken as nanoseconds; else the last per-point time of a PCD
``timestamp``/``time`` field (seconds, the sweep's end); else a nominal rate (10 Hz) from ``start_ns``.
KITTI raw's ``timestamps.txt`` next to a ``data/`` folder is used when present.
:func:`iter_sweep_pairs` gives the pair shape of :mod:`zeroflow_ros.data.av2` (ego motion from the
pose file, or KISS-ICP). Bad input raises :class:`SweepError` naming the file and what was expected.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np

from zeroflow_ros.data.av2 import DataError

logger = logging.getLogger(__name__)

NOMINAL_PERIOD_NS = 100_000_000  # 10 Hz
_PCD_TYPES = {('F', 4): '<f4', ('F', 8): '<f8', ('U', 1): 'u1', ('U', 2): '<u2', ('U', 4): '<u4',
              ('U', 8): '<u8', ('I', 1): 'i1', ('I', 2): '<i2', ('I', 4): '<i4', ('I', 8): '<i8'}
_TIME_FIELDS = ('timestamp', 'time', 't')


class SweepError(DataError):
    """A sweep or pose file is missing, truncated or not in the expected format (names the file)."""


@dataclass
class Sweep:
    """One lidar sweep: xyz in the sensor frame plus extra per-point fields in file order."""

    path: Path
    points: np.ndarray                      # (N,3) float32
    fields: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (N,) or (N,count)
    stamp_ns: int | None = None


# --------------------------------------------------------------------------------------- KITTI

def read_kitti_bin(path: Path) -> Sweep:
    """Read a KITTI velodyne ``.bin`` (N x 4 float32: x, y, z, reflectance -> field ``intensity``)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SweepError(f'{path}: cannot read ({exc})') from None
    if len(data) % 16:
        raise SweepError(f'{path}: {len(data)} bytes is not a multiple of 16 (KITTI .bin: N x 4 float32)')
    raw = np.frombuffer(data, dtype='<f4')
    arr = raw.reshape(-1, 4)
    return Sweep(path, np.ascontiguousarray(arr[:, :3]), {'intensity': arr[:, 3].copy()},
                 _int_stem(path))


def write_kitti_bin(path: Path, points: np.ndarray, intensity: np.ndarray | None = None) -> None:
    pts = np.asarray(points, dtype='<f4')[:, :3]
    inten = np.zeros(len(pts), '<f4') if intensity is None else np.asarray(intensity, '<f4')
    np.concatenate([pts, inten[:, None]], axis=1).tofile(path)


# ----------------------------------------------------------------------------------------- LZF

def lzf_decompress(src: bytes, out_len: int, *, name: str = 'LZF block') -> bytes:
    """Decompress an LZF block (liblzf format, as PCL writes it) of known output size, with liblzf."""
    import lzf
    try:
        out = lzf.decompress(bytes(src), int(out_len))
    except ValueError:
        # liblzf says EINVAL for both faults and cannot tell which one it met.
        raise SweepError(f'{name}: corrupt or truncated LZF data (a back-reference out of range or a '
                         'literal run past the end)') from None
    if out is None:
        raise SweepError(f'{name}: decompresses to more than the {out_len} bytes the header says')
    if len(out) != out_len:
        raise SweepError(f'{name}: decompressed to {len(out)} bytes, header says {out_len}')
    return out


def lzf_compress_literal(data: bytes) -> bytes:
    """Encode ``data`` as a valid LZF stream of literal runs only (for data liblzf cannot shrink)."""
    out = bytearray()
    for k in range(0, len(data), 32):
        chunk = data[k:k + 32]
        out.append(len(chunk) - 1)
        out += chunk
    return bytes(out)


def _lzf_compress(data: bytes) -> bytes:
    import lzf
    packed = lzf.compress(data)
    return lzf_compress_literal(data) if packed is None else packed


# ----------------------------------------------------------------------------------------- PCD

def _parse_pcd_header(path: Path, raw: bytes) -> tuple[dict[str, list[str]], int]:
    hdr: dict[str, list[str]] = {}
    pos = 0
    while True:
        end = raw.find(b'\n', pos)
        if end < 0:
            raise SweepError(f'{path}: PCD header has no DATA line (not a PCD file or truncated)')
        try:
            line = raw[pos:end].decode('ascii').strip()
        except UnicodeDecodeError:
            raise SweepError(f'{path}: PCD header is not ASCII (not a PCD file?)') from None
        pos = end + 1
        if not line or line.startswith('#'):
            continue
        key, *vals = line.split()
        hdr[key.upper()] = vals
        if key.upper() == 'DATA':
            return hdr, pos
        if len(hdr) > 64:
            raise SweepError(f'{path}: no DATA line within the first 64 header entries (not a PCD file?)')


def _pcd_metadata(path: Path, hdr: dict[str, list[str]]):
    """pypcd4 ``MetaData`` from the header, PCL's defaults filled in (COUNT 1, WIDTH = POINTS)."""
    from pypcd4.pypcd4 import MetaData
    for key in ('FIELDS', 'SIZE', 'TYPE'):
        if key not in hdr:
            raise SweepError(f'{path}: PCD header lacks {key}')
    names, sizes, types = hdr['FIELDS'], hdr['SIZE'], [t.upper() for t in hdr['TYPE']]
    counts = hdr.get('COUNT', ['1'] * len(names))
    if not len(names) == len(sizes) == len(types) == len(counts):
        raise SweepError(f'{path}: FIELDS/SIZE/TYPE/COUNT have different lengths '
                         f'({len(names)}, {len(sizes)}, {len(types)}, {len(counts)})')
    bad = [(t, s) for t, s in zip(types, sizes) if (t, int(s) if s.isdigit() else s) not in _PCD_TYPES]
    if bad:
        raise SweepError(f'{path}: unsupported TYPE/SIZE {bad[0]} (expected F4/F8/U1-8/I1-8)')
    try:
        height = int(hdr.get('HEIGHT', ['1'])[0])
        points = int(hdr['POINTS'][0]) if 'POINTS' in hdr else int(hdr.get('WIDTH', ['0'])[0]) * height
        mode = hdr['DATA'][0].lower() if hdr['DATA'] else ''
        if mode not in ('ascii', 'binary', 'binary_compressed'):
            raise SweepError(f'{path}: DATA {mode!r} not supported '
                             '(expected ascii, binary or binary_compressed)')
        # Padding fields ('_') get unique names: pypcd4 wants distinct ones.
        fields = [f'zf_padding_{i}' if n == '_' else n for i, n in enumerate(names)]
        return MetaData.model_validate({
            'fields': fields, 'size': [int(s) for s in sizes], 'type': types,
            'count': [int(c) for c in counts], 'points': points,
            'width': int(hdr.get('WIDTH', [str(points)])[0]), 'height': height, 'data': mode})
    except (ValueError, IndexError) as exc:
        if isinstance(exc, SweepError):
            raise
        raise SweepError(f'{path}: malformed PCD header ({str(exc).splitlines()[0]})') from None


def _check_pcd_size(path: Path, meta, raw: bytes, pos: int) -> None:
    """Name the truncation before decoding: pypcd4 would read a short block as fewer points."""
    n, rec = meta.points, meta.build_dtype().itemsize
    if meta.data.value == 'binary' and len(raw) - pos < n * rec:
        raise SweepError(f'{path}: binary data has {len(raw) - pos} bytes, expected {n} x {rec} (truncated?)')
    if meta.data.value == 'binary_compressed' and n:
        if len(raw) - pos < 8:
            raise SweepError(f'{path}: binary_compressed data lacks its 8-byte size header (truncated?)')
        csize, usize = (int(v) for v in np.frombuffer(raw, '<u4', count=2, offset=pos))
        if len(raw) - pos - 8 < csize:
            raise SweepError(f'{path}: compressed block has {len(raw) - pos - 8} bytes, header says {csize} '
                             '(truncated?)')
        if usize != n * rec:
            raise SweepError(f'{path}: uncompressed size {usize} != {n} points x record size ({n * rec})')


def _decode_pcd(path: Path, meta, body: bytes) -> np.ndarray:
    """Decode the data block with pypcd4 (liblzf for binary_compressed) into its structured array."""
    import io

    from pypcd4 import PointCloud
    try:
        data = PointCloud.from_fileobj(io.BytesIO(meta.compose_header().encode() + body)).pc_data
    except (ValueError, TypeError, RuntimeError) as exc:
        # pypcd4 passes liblzf's ValueError (or None -> TypeError) and numpy's parse errors through.
        raise SweepError(f'{path}: cannot decode the {meta.data.value} data (corrupt?): '
                         f'{type(exc).__name__}: {exc}') from None
    data = np.atleast_1d(data)
    if len(data) < meta.points:
        raise SweepError(f'{path}: {meta.data.value} data has {len(data)} points, expected {meta.points} '
                         '(truncated?)')
    return data[:meta.points]


def read_pcd(path: Path) -> Sweep:
    """Read a PCD file (ascii, binary or binary_compressed) with ``pypcd4``; x, y, z fields required."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SweepError(f'{path}: cannot read ({exc})') from None
    hdr, pos = _parse_pcd_header(path, raw)
    meta = _pcd_metadata(path, hdr)
    _check_pcd_size(path, meta, raw, pos)
    data = _decode_pcd(path, meta, raw[pos:])
    # pypcd4 splits a field of COUNT k into k columns, in header order: gather them back.
    flat = iter(data.dtype.names)
    cols: dict[str, np.ndarray] = {}
    compressed = meta.data.value == 'binary_compressed'
    for name, c in zip(meta.fields, meta.count):
        parts = [data[next(flat)] for _ in range(c)]
        if name.startswith('zf_padding_'):
            continue
        if c == 1:
            cols[name] = np.ascontiguousarray(parts[0])
        elif compressed:
            # PCL stores a COUNT k field point by point (k values each) in its block; pypcd4 1.5 cuts
            # that block into k runs of N values instead, so its k columns, end to end, are the block.
            cols[name] = np.concatenate(parts).reshape(len(data), c)
        else:
            cols[name] = np.stack(parts, axis=1)
    missing = [c for c in ('x', 'y', 'z') if c not in cols]
    if missing:
        raise SweepError(f'{path}: PCD has no fields {missing} (has {hdr["FIELDS"]})')
    points = np.stack([cols.pop(c).astype(np.float32) for c in ('x', 'y', 'z')], axis=1)
    stamp = _int_stem(path)
    if stamp is None:
        tname = next((t for t in _TIME_FIELDS
                      if t in cols and np.issubdtype(cols[t].dtype, np.floating)), None)
        if tname is not None and len(cols[tname]) and np.isfinite(cols[tname]).any():
            # Per-point seconds: the sweep is stamped at its last point (the file-name convention of
            # the PJLab sample; ROS drivers differ, a bag records whatever the driver used).
            stamp = int(round(float(np.nanmax(cols[tname])) * 1e9))
    return Sweep(path, points, cols, stamp)


def write_pcd(path: Path, points: np.ndarray, fields: dict[str, np.ndarray] | None = None,
              data: str = 'binary') -> None:
    """Write a PCD v0.7 file (ascii, binary, or binary_compressed with literal-only LZF)."""
    cols = {'x': np.asarray(points[:, 0], '<f4'), 'y': np.asarray(points[:, 1], '<f4'),
            'z': np.asarray(points[:, 2], '<f4')}
    cols.update({k: np.asarray(v) for k, v in (fields or {}).items()})
    rev = {np.dtype(v): k for k, v in _PCD_TYPES.items()}
    spec = []
    for k, v in cols.items():
        dt = v.dtype.newbyteorder('<') if v.dtype.itemsize > 1 else v.dtype
        if dt not in rev:
            raise SweepError(f'{path}: cannot write field {k!r} of dtype {v.dtype} to PCD')
        spec.append((k, dt, rev[dt]))
        cols[k] = v.astype(dt)
    n = len(points)
    head = ['# .PCD v0.7 - Point Cloud Data file format', 'VERSION 0.7',
            'FIELDS ' + ' '.join(k for k, _, _ in spec),
            'SIZE ' + ' '.join(str(t[1]) for _, _, t in spec),
            'TYPE ' + ' '.join(t[0] for _, _, t in spec),
            'COUNT ' + ' '.join('1' for _ in spec),
            f'WIDTH {n}', 'HEIGHT 1', 'VIEWPOINT 0 0 0 1 0 0 0', f'POINTS {n}', f'DATA {data}']
    body: bytes
    if data == 'ascii':
        lines = [' '.join(repr(float(v)) if dt.kind == 'f' else str(int(v))
                          for v, (_, dt, _) in zip(row, spec))
                 for row in zip(*(cols[k] for k, _, _ in spec))]
        body = ('\n'.join(lines) + '\n').encode()
    elif data == 'binary':
        rec = np.empty(n, np.dtype([(k, dt) for k, dt, _ in spec]))
        for k, _, _ in spec:
            rec[k] = cols[k]
        body = rec.tobytes()
    elif data == 'binary_compressed':
        plain = b''.join(cols[k].tobytes() for k, _, _ in spec)
        comp = _lzf_compress(plain)
        body = np.array([len(comp), len(plain)], '<u4').tobytes() + comp
    else:
        raise SweepError(f'{path}: DATA {data!r} not supported')
    Path(path).write_bytes(('\n'.join(head) + '\n').encode() + body)


# ----------------------------------------------------------------------------------- folders

def _int_stem(path: Path) -> int | None:
    # Only long integer names are nanosecond times (AV2 style); short ones are indices (KITTI 0000000001).
    stem = Path(path).stem
    return int(stem) if stem.isdigit() and len(stem) >= 16 else None


def read_sweep(path: Path) -> Sweep:
    """Read one sweep by extension (``.bin`` KITTI, ``.pcd``)."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext == '.bin':
        return read_kitti_bin(path)
    if ext == '.pcd':
        return read_pcd(path)
    raise SweepError(f'{path}: unknown sweep format {ext!r} (expected .bin or .pcd)')


def list_sweep_files(folder: Path) -> list[Path]:
    """Return the sweep files (``.bin`` or ``.pcd``, one kind) sorted by name; KITTI ``data/`` found too."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SweepError(f'{folder}: not a folder of sweeps')
    for cand in (folder, folder / 'data', folder / 'velodyne_points' / 'data'):
        if not cand.is_dir():
            continue
        files = sorted(p for p in cand.iterdir() if p.suffix.lower() in ('.bin', '.pcd'))
        if files:
            kinds = {p.suffix.lower() for p in files}
            if len(kinds) > 1:
                raise SweepError(f'{cand}: mixes {sorted(kinds)} files; expected one sweep format')
            return files
    raise SweepError(f'{folder}: no .bin or .pcd sweep files (also looked in data/, velodyne_points/data/)')


def read_kitti_timestamps(path: Path) -> np.ndarray:
    """KITTI raw ``timestamps.txt`` (``YYYY-MM-DD HH:MM:SS.fffffffff`` per line, UTC) -> int64 ns."""
    out = []
    for k, line in enumerate(Path(path).read_text().splitlines()):
        line = line.strip()
        if not line:
            continue
        try:
            day, frac = line.split('.') if '.' in line else (line, '0')
            base = datetime.strptime(day, '%Y-%m-%d %H:%M:%S').replace(tzinfo=timezone.utc)
            out.append(int(base.timestamp()) * 1_000_000_000 + int(frac.ljust(9, '0')[:9]))
        except ValueError:
            raise SweepError(
                f'{path}:{k + 1}: expected "YYYY-MM-DD HH:MM:SS.fffffffff", got {line!r}') from None
    return np.array(out, dtype=np.int64)


def sweep_stamps(files: list[Path], sweeps_stamps: list[int | None], start_ns: int = 0,
                 period_ns: int = NOMINAL_PERIOD_NS) -> np.ndarray:
    """Time of each sweep: the recorded one when every sweep has it, else nominal ``start + k * period``."""
    if files and all(s is not None for s in sweeps_stamps):
        return np.array(sweeps_stamps, dtype=np.int64)
    ts_file = Path(files[0]).parent.parent / 'timestamps.txt' if files else None
    if ts_file is not None and ts_file.is_file():
        ts = read_kitti_timestamps(ts_file)
        # KITTI names sweeps by their index into timestamps.txt.
        idx = [int(f.stem) if f.stem.isdigit() else None for f in files]
        if all(i is not None and 0 <= i < len(ts) for i in idx):
            return ts[np.array(idx)]
        logger.warning('%s: does not cover the sweep file indices; using nominal %.1f Hz', ts_file,
                       1e9 / period_ns)
    return start_ns + period_ns * np.arange(len(files), dtype=np.int64)


def iter_sweeps(folder: Path, start_ns: int = 0, period_ns: int = NOMINAL_PERIOD_NS) -> Iterator[Sweep]:
    """Sweeps of a folder in name order with ``stamp_ns`` set (recorded, or nominal 10 Hz)."""
    files = list_sweep_files(folder)
    # Stamps need every file's own stamp first: from the name, else (PCD) its point times. Those PCDs
    # are read twice rather than all held in memory (a long drive would not fit).
    own = [_int_stem(f) for f in files]
    if files[0].suffix.lower() == '.pcd' and any(s is None for s in own):
        own = [s if s is not None else read_pcd(f).stamp_ns for s, f in zip(own, files)]
    stamps = sweep_stamps(files, own, start_ns, period_ns)
    if (np.diff(stamps) <= 0).any():
        i = int(np.nonzero(np.diff(stamps) <= 0)[0][0])
        raise SweepError(f'{files[i + 1]}: sweep time {stamps[i + 1]} is not after {files[i]} ({stamps[i]})')
    for k, f in enumerate(files):
        s = read_sweep(f)
        s.stamp_ns = int(stamps[k])
        yield s


def read_pose_file(path: Path) -> tuple[list[str | None], np.ndarray]:
    """KITTI-style poses: ``[name] r11 r12 r13 t1 r21 ... t3`` per line -> names, (K,4,4) float64.

    Rotations are re-orthonormalised (SVD): text files carry ~1e-6 rounding that breaks chained
    inverses.
    """
    path = Path(path)
    try:
        lines = [ln for ln in path.read_text().splitlines()
                 if ln.strip() and not ln.lstrip().startswith('#')]
    except OSError as exc:
        raise SweepError(f'{path}: cannot read ({exc})') from None
    names: list[str | None] = []
    mats = []
    for k, line in enumerate(lines):
        tok = line.split()
        if len(tok) == 13:
            name, tok = tok[0], tok[1:]
        elif len(tok) == 12:
            name = None
        else:
            raise SweepError(f'{path}:{k + 1}: expected 12 numbers (3x4 [R|t]) optionally after a name, '
                             f'got {len(tok)} tokens')
        try:
            m = np.eye(4)
            m[:3] = np.array(tok, dtype=np.float64).reshape(3, 4)
        except ValueError:
            raise SweepError(f'{path}:{k + 1}: non-numeric pose values') from None
        u, _, vt = np.linalg.svd(m[:3, :3])
        r = u @ vt
        if np.linalg.det(r) < 0 or np.abs(r - m[:3, :3]).max() > 1e-2:
            raise SweepError(f'{path}:{k + 1}: 3x3 block is not a rotation')
        m[:3, :3] = r
        names.append(name)
        mats.append(m)
    if not mats:
        raise SweepError(f'{path}: no poses')
    return names, np.stack(mats)


def poses_for_sweeps(path: Path, files: list[Path]) -> np.ndarray:
    """Poses matching the sweep files: by name when the pose file has names, else by line order."""
    names, mats = read_pose_file(path)
    if names[0] is not None:
        index = {n: i for i, n in enumerate(names)}
        missing = [f.stem for f in files if f.stem not in index]
        if missing:
            raise SweepError(f'{path}: no pose for sweeps {missing[:3]}{"..." if len(missing) > 3 else ""}')
        return mats[[index[f.stem] for f in files]]
    if len(mats) < len(files):
        raise SweepError(f'{path}: {len(mats)} poses for {len(files)} sweeps (one line per sweep expected)')
    return mats[:len(files)]


def iter_sweep_pairs(folder: Path, poses_file: Path | None = None, lidar_odometry=None,
                     start_ns: int = 0) -> Iterator:
    """Consecutive sweep pairs of a KITTI/PCD folder as :class:`~zeroflow_ros.data.av2.Pair`.

    ``ego1_T_ego0`` = ``inv(P1) @ P0`` from a KITTI-style pose file; else, with ``lidar_odometry``
    (an :class:`~zeroflow_ros.core.odometry.OdometryConfig`, or True for its defaults), estimated by
    KISS-ICP; else None. Points are in the sensor frame of their own sweep; no ground, no labels.
    """
    from zeroflow_ros.core.geometry import invert
    from zeroflow_ros.data.av2 import Pair
    files = list_sweep_files(folder)
    poses = poses_for_sweeps(poses_file, files) if poses_file else None
    icp = None
    if poses is None and lidar_odometry:
        from zeroflow_ros.core.odometry import LidarOdometry, OdometryConfig
        icp = LidarOdometry(lidar_odometry if isinstance(lidar_odometry, OdometryConfig) else None)
    prev = None
    for k, s in enumerate(iter_sweeps(folder, start_ns=start_ns)):
        if icp is not None:
            icp.register(s.points, s.stamp_ns)
        if prev is not None:
            if poses is not None:
                T = invert(poses[k]) @ poses[k - 1]
            else:
                T = icp.last_motion() if icp is not None else None
            yield Pair(Path(folder).name, int(prev.stamp_ns), int(s.stamp_ns), prev.points, s.points, T,
                       None, None, None)
        prev = s
