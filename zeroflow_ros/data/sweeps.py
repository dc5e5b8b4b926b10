"""Readers for folders of lidar sweeps without the AV2 layout: KITTI ``.bin`` and PCD files, plus pose files.

* KITTI velodyne ``.bin``: little-endian float32 rows ``x, y, z, reflectance``.
* PCD v0.7 (PCL): ``DATA ascii``, ``binary`` (interleaved records) and ``binary_compressed``
  (one LZF block holding the fields column by column). Any ``FIELDS``/``SIZE``/``TYPE``/``COUNT``;
  fields with ``COUNT > 1`` come back as (N, count) arrays; padding fields named ``_`` are dropped.
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
    """Decompress an LZF block (liblzf format, as PCL writes it) of known output size."""
    out = bytearray(out_len)
    i = o = 0
    n = len(src)
    try:
        while i < n:
            ctrl = src[i]
            i += 1
            if ctrl < 32:
                ln = ctrl + 1
                if i + ln > n or o + ln > out_len:
                    raise SweepError(f'{name}: literal run past the end of the data (corrupt or truncated)')
                out[o:o + ln] = src[i:i + ln]
                i += ln
                o += ln
            else:
                ln = ctrl >> 5
                if ln == 7:
                    ln += src[i]
                    i += 1
                ref = o - ((ctrl & 0x1F) << 8) - src[i] - 1
                i += 1
                ln += 2
                if ref < 0 or o + ln > out_len:
                    raise SweepError(f'{name}: back-reference out of range (corrupt or truncated)')
                if ref + ln <= o:
                    out[o:o + ln] = out[ref:ref + ln]
                else:
                    # Overlapping copy repeats the last (o - ref) bytes: a run.
                    period = out[ref:o]
                    reps = -(-ln // len(period))
                    out[o:o + ln] = (period * reps)[:ln]
                o += ln
    except IndexError:
        raise SweepError(f'{name}: ends inside a back-reference (corrupt or truncated)') from None
    if o != out_len:
        raise SweepError(f'{name}: decompressed to {o} bytes, header says {out_len}')
    return bytes(out)


def lzf_compress_literal(data: bytes) -> bytes:
    """Encode ``data`` as a valid LZF stream of literal runs only (no compression; for writing PCDs)."""
    out = bytearray()
    for k in range(0, len(data), 32):
        chunk = data[k:k + 32]
        out.append(len(chunk) - 1)
        out += chunk
    return bytes(out)


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


def read_pcd(path: Path) -> Sweep:
    """Read a PCD file (ascii, binary or binary_compressed); x, y, z fields required."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SweepError(f'{path}: cannot read ({exc})') from None
    hdr, pos = _parse_pcd_header(path, raw)
    for key in ('FIELDS', 'SIZE', 'TYPE'):
        if key not in hdr:
            raise SweepError(f'{path}: PCD header lacks {key}')
    names = hdr['FIELDS']
    sizes = [int(s) for s in hdr['SIZE']]
    types = [t.upper() for t in hdr['TYPE']]
    counts = [int(c) for c in hdr.get('COUNT', ['1'] * len(names))]
    if not len(names) == len(sizes) == len(types) == len(counts):
        raise SweepError(f'{path}: FIELDS/SIZE/TYPE/COUNT have different lengths '
                         f'({len(names)}, {len(sizes)}, {len(types)}, {len(counts)})')
    try:
        dts = [np.dtype(_PCD_TYPES[(t, s)]) for t, s in zip(types, sizes)]
    except KeyError as exc:
        raise SweepError(f'{path}: unsupported TYPE/SIZE {exc.args[0]} (expected F4/F8/U1-8/I1-8)') from None
    if 'POINTS' in hdr:
        n = int(hdr['POINTS'][0])
    else:
        n = int(hdr.get('WIDTH', ['0'])[0]) * int(hdr.get('HEIGHT', ['1'])[0])
    mode = hdr['DATA'][0].lower() if hdr['DATA'] else ''
    cols: dict[str, np.ndarray] = {}
    if mode == 'ascii':
        text = raw[pos:].decode('ascii', errors='replace').split()
        width = sum(counts)
        if len(text) < n * width:
            raise SweepError(
                f'{path}: ascii data has {len(text)} values, expected {n} x {width} (truncated?)')
        vals = np.array(text[:n * width], dtype=np.float64).reshape(n, width)
        k = 0
        for name, dt, c in zip(names, dts, counts):
            cols[name] = vals[:, k:k + c].astype(dt) if c > 1 else vals[:, k].astype(dt)
            k += c
    elif mode == 'binary':
        rec = np.dtype([(f'f{i}', dt, (c,)) for i, (dt, c) in enumerate(zip(dts, counts))])
        if len(raw) - pos < n * rec.itemsize:
            raise SweepError(f'{path}: binary data has {len(raw) - pos} bytes, expected {n} x {rec.itemsize} '
                             '(truncated?)')
        arr = np.frombuffer(raw, rec, count=n, offset=pos)
        for i, (name, c) in enumerate(zip(names, counts)):
            v = arr[f'f{i}']
            cols[name] = v.copy() if c > 1 else v[:, 0].copy()
    elif mode == 'binary_compressed':
        if len(raw) - pos < 8:
            raise SweepError(f'{path}: binary_compressed data lacks its 8-byte size header (truncated?)')
        csize, usize = (int(v) for v in np.frombuffer(raw, '<u4', count=2, offset=pos))
        if len(raw) - pos - 8 < csize:
            raise SweepError(f'{path}: compressed block has {len(raw) - pos - 8} bytes, header says {csize} '
                             '(truncated?)')
        expect = n * sum(dt.itemsize * c for dt, c in zip(dts, counts))
        if usize != expect:
            raise SweepError(f'{path}: uncompressed size {usize} != {n} points x record size ({expect})')
        buf = lzf_decompress(raw[pos + 8:pos + 8 + csize], usize, name=str(path))
        off = 0
        for name, dt, c in zip(names, dts, counts):
            v = np.frombuffer(buf, dt, count=n * c, offset=off)
            cols[name] = v.reshape(n, c).copy() if c > 1 else v.copy()
            off += n * c * dt.itemsize
    else:
        raise SweepError(f'{path}: DATA {mode!r} not supported (expected ascii, binary or binary_compressed)')
    missing = [c for c in ('x', 'y', 'z') if c not in cols]
    if missing:
        raise SweepError(f'{path}: PCD has no fields {missing} (has {names})')
    points = np.stack([cols.pop(c).astype(np.float32) for c in ('x', 'y', 'z')], axis=1)
    extra = {k: v for k, v in cols.items() if k != '_'}
    stamp = _int_stem(path)
    if stamp is None:
        tname = next((t for t in _TIME_FIELDS
                      if t in extra and np.issubdtype(extra[t].dtype, np.floating)), None)
        if tname is not None and len(extra[tname]) and np.isfinite(extra[tname]).any():
            # Per-point seconds: the sweep is stamped at its last point (the file-name convention of
            # the PJLab sample; ROS drivers differ, a bag records whatever the driver used).
            stamp = int(round(float(np.nanmax(extra[tname])) * 1e9))
    return Sweep(path, points, extra, stamp)


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
        comp = lzf_compress_literal(plain)
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
    # Stamps need every file's own stamp first (cheap for .bin: from the name; PCDs are read once here).
    first = [read_sweep(f) for f in files] if files[0].suffix.lower() == '.pcd' else None
    own = [s.stamp_ns for s in first] if first is not None else [_int_stem(f) for f in files]
    stamps = sweep_stamps(files, own, start_ns, period_ns)
    if (np.diff(stamps) <= 0).any():
        i = int(np.nonzero(np.diff(stamps) <= 0)[0][0])
        raise SweepError(f'{files[i + 1]}: sweep time {stamps[i + 1]} is not after {files[i]} ({stamps[i]})')
    for k, f in enumerate(files):
        s = first[k] if first is not None else read_sweep(f)
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
