"""PointCloud2 codec against hand-built byte layouts, a re-implementation of sensor_msgs_py's
``read_points`` semantics, brute-force ``struct`` decoding of random layouts, and real DDS."""
from __future__ import annotations

import array
import struct
import sys
import types

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zeroflow_ros.core.pointcloud2 import (
    TIME_NAMES, CloudError, DecodedCloud, decode, encode, encode_buffer, ns_to_stamp, stamp_to_ns)

STRUCT = {1: 'b', 2: 'B', 3: 'h', 4: 'H', 5: 'i', 6: 'I', 7: 'f', 8: 'd'}
SIZE = {1: 1, 2: 1, 3: 2, 4: 2, 5: 4, 6: 4, 7: 4, 8: 8}
INT_RANGE = {1: (-128, 127), 2: (0, 255), 3: (-32768, 32767), 4: (0, 65535),
             5: (-2 ** 31, 2 ** 31 - 1), 6: (0, 2 ** 32 - 1)}


# ------------------------------------------------------------------ plain message stand-ins

def Field(name, offset, datatype, count=1):
    return types.SimpleNamespace(name=name, offset=offset, datatype=datatype, count=count)


XY = (Field('x', 0, 7), Field('y', 4, 7))


def Msg(fields, data, *, width, height=1, point_step, row_step=None, bigendian=False, dense=False,
        frame_id='lidar', stamp=(12, 345)):
    return types.SimpleNamespace(
        header=types.SimpleNamespace(frame_id=frame_id,
                                     stamp=types.SimpleNamespace(sec=stamp[0], nanosec=stamp[1])),
        height=height, width=width, fields=fields, is_bigendian=bigendian, point_step=point_step,
        row_step=width * point_step if row_step is None else row_step, data=data, is_dense=dense)


def build(fields, rows, *, point_step, row_step=None, bigendian=False, fill=0xA5):
    """Bytes of an organised cloud: rows[r][c] is a dict name -> value, packed with struct.

    Everything not covered by a field (point padding, row padding) holds ``fill`` so a decoder
    that reads padding produces visible garbage.
    """
    height, width = len(rows), len(rows[0]) if rows else 0
    row_step = width * point_step if row_step is None else row_step
    buf = bytearray([fill]) * (row_step * height)
    order = '>' if bigendian else '<'
    for r, row in enumerate(rows):
        for c, point in enumerate(row):
            base = r * row_step + c * point_step
            for f in fields:
                if f.name in point:
                    struct.pack_into(order + STRUCT[f.datatype], buf, base + f.offset, point[f.name])
    return bytes(buf)


def brute_force(fields, data, *, width, height, point_step, row_step, bigendian):
    """Independent decoder: struct.unpack_from per point, Python floats, finite test per point."""
    order = '>' if bigendian else '<'
    by_name = {f.name: f for f in fields}

    def first(names):
        return next((by_name[n] for n in names if n in by_name), None)

    f_int, f_time = first(('intensity', 'reflectivity')), first(TIME_NAMES)
    f_ring = first(('ring', 'laser_number'))
    xyz, idx, inten, tim, ring = [], [], [], [], []
    for r in range(height):
        for c in range(width):
            base = r * row_step + c * point_step

            def get(f):
                return struct.unpack_from(order + STRUCT[f.datatype], data, base + f.offset)[0]

            with np.errstate(over='ignore'):
                p = [np.float32(get(by_name[a])) for a in 'xyz']
            if not all(np.isfinite(v) for v in p):
                continue
            xyz.append(p)
            idx.append(r * width + c)
            if f_int:
                inten.append(np.float32(get(f_int)))
            if f_time:
                v = get(f_time)
                tim.append(v * 1e-9 if f_time.datatype <= 6 else float(v))
            if f_ring:
                ring.append(get(f_ring))
    return dict(xyz=np.array(xyz, np.float32).reshape(-1, 3), indices=np.array(idx, np.int64),
                intensity=np.array(inten, np.float32) if f_int else None,
                time=np.array(tim, np.float64) if f_time else None,
                ring=np.array(ring, np.int64) if f_ring else None)


def assert_matches(dec: DecodedCloud, exp: dict) -> None:
    np.testing.assert_array_equal(dec.xyz, exp['xyz'])
    assert dec.xyz.dtype == np.float32 and dec.xyz.shape == exp['xyz'].shape
    np.testing.assert_array_equal(dec.indices, exp['indices'])
    assert dec.indices.dtype == np.int64
    for key in ('intensity', 'ring'):
        if exp[key] is None:
            assert getattr(dec, key) is None, key
        else:
            np.testing.assert_array_equal(getattr(dec, key), exp[key], err_msg=key)
    if exp['time'] is None:
        assert dec.time is None
    else:
        np.testing.assert_allclose(dec.time, exp['time'], rtol=1e-15, atol=0)


# ----------------------------------------- sensor_msgs_py read_points semantics (re-implemented)

_REF_NUMPY = {1: np.int8, 2: np.uint8, 3: np.int16, 4: np.uint16, 5: np.int32, 6: np.uint32,
              7: np.float32, 8: np.float64}


def ref_dtype_from_fields(fields, point_step):
    """As sensor_msgs_py.point_cloud2.dtype_from_fields: native types, count>1 -> name_i subfields."""
    names, formats, offsets = [], [], []
    for i, f in enumerate(fields):
        dt = np.dtype(_REF_NUMPY[f.datatype])
        name = f.name or f'unnamed_field_{i}'
        for a in range(f.count):
            names.append(f'{name}_{a}' if f.count > 1 else name)
            offsets.append(f.offset + a * dt.itemsize)
            formats.append(dt.str)
    return np.dtype({'names': names, 'formats': formats, 'offsets': offsets, 'itemsize': point_step})


def ref_read_points(cloud, field_names=None, skip_nans=False):
    """As sensor_msgs_py.point_cloud2.read_points (no uvs, no reshape); also returns kept indices.

    The original byteswaps the message buffer in place; swapping a copy is equivalent here.
    Like the original it assumes rows are not padded (row_step is ignored).
    """
    points = np.ndarray(shape=(cloud.width * cloud.height,),
                        dtype=ref_dtype_from_fields(cloud.fields, cloud.point_step), buffer=cloud.data)
    if field_names is not None:
        points = points[list(field_names)]
    if bool(sys.byteorder != 'little') != bool(cloud.is_bigendian):
        points = points.byteswap()
    idx = np.arange(len(points))
    if skip_nans and not cloud.is_dense:
        keep = np.ones(len(points), dtype=bool)
        for name in points.dtype.names:
            keep &= ~np.isnan(points[name])
        points, idx = points[keep], idx[keep]
    return points, idx


# ------------------------------------------------------------------------ hand-built layouts

@pytest.mark.parametrize('bigendian', [False, True])
@pytest.mark.parametrize('datatype', sorted(STRUCT))
def test_every_datatype_and_endianness(datatype, bigendian):
    # x, y, z of `datatype` at scattered offsets, a FLOAT64 intensity in between, padded point_step.
    s = SIZE[datatype]
    fields = [Field('y', 3, datatype), Field('intensity', 3 + s + 1, 8), Field('x', 3 + s + 10, datatype),
              Field('z', 3 + 2 * s + 12, datatype)]
    point_step = 3 + 3 * s + 12 + 5
    if datatype in INT_RANGE:
        lo, hi = INT_RANGE[datatype]
        values = [(lo, hi, 0), (hi, lo, 1), (1, -1 if lo < 0 else 2, lo)]
    else:
        values = [(1.5, -2.25, 1e-3), (-3e3, 7.0, 0.0), (123.456, -1e-5, 42.0)]
    points = [dict(x=a, y=b, z=c, intensity=float(i) * 0.5) for i, (a, b, c) in enumerate(values)]
    data = build(fields, [points], point_step=point_step, bigendian=bigendian)
    dec = decode(Msg(fields, data, width=3, point_step=point_step, bigendian=bigendian))
    expected = np.array(values, dtype=np.float64).astype(np.float32)
    np.testing.assert_array_equal(dec.xyz, expected)
    np.testing.assert_array_equal(dec.intensity, np.float32([0, 0.5, 1.0]))
    np.testing.assert_array_equal(dec.indices, [0, 1, 2])
    assert (dec.frame_id, dec.stamp_ns, dec.n_input) == ('lidar', 12 * 10 ** 9 + 345, 3)


def test_organised_cloud_with_row_padding_and_invalid_points():
    fields = [*XY, Field('z', 8, 7), Field('intensity', 16, 7),
              Field('ring', 20, 4), Field('t', 24, 6)]
    point_step, width, height = 32, 4, 3
    row_step = width * point_step + 7  # odd row padding: rows start unaligned
    rows, k = [], 0
    for r in range(height):
        row = []
        for c in range(width):
            row.append(dict(x=float(k), y=-float(k), z=0.5 * k, intensity=10.0 + k, ring=r, t=1000 * k))
            k += 1
        rows.append(row)
    rows[0][1]['x'] = float('nan')
    rows[1][3]['z'] = float('inf')
    rows[2][0]['y'] = float('-inf')
    data = build(fields, rows, point_step=point_step, row_step=row_step)
    msg = Msg(fields, data, width=width, height=height, point_step=point_step, row_step=row_step)
    dec = decode(msg)
    kept = [i for i in range(12) if i not in (1, 7, 8)]
    np.testing.assert_array_equal(dec.indices, kept)
    np.testing.assert_array_equal(dec.xyz[:, 0], np.float32(kept))
    np.testing.assert_array_equal(dec.xyz[:, 2], np.float32(kept) * 0.5)
    np.testing.assert_array_equal(dec.intensity, 10.0 + np.float32(kept))
    np.testing.assert_array_equal(dec.ring, np.array(kept) // width)
    np.testing.assert_allclose(dec.time, np.array(kept) * 1000e-9, rtol=1e-15)
    assert (dec.height, dec.width, dec.n_input, dec.n_dropped, dec.time_field) == (3, 4, 12, 3, 't')
    assert_matches(dec, brute_force(fields, data, width=width, height=height, point_step=point_step,
                                    row_step=row_step, bigendian=False))
    # scatter maps per-point results back to input order, dropped points get the fill value
    back = dec.scatter(dec.xyz[:, 0], fill=-1.0)
    assert back.shape == (12,) and list(back[[1, 7, 8]]) == [-1, -1, -1]
    np.testing.assert_array_equal(back[kept], np.float32(kept))


def test_optional_channel_names_and_units():
    # Ouster-like: both intensity and reflectivity (intensity wins), uint32 't' in ns, uint8 ring
    fields = [*XY, Field('z', 8, 7), Field('reflectivity', 12, 4),
              Field('intensity', 16, 7), Field('laser_number', 20, 2), Field('timestamp', 24, 8)]
    pts = [dict(x=1.0, y=2.0, z=3.0, reflectivity=7, intensity=0.25, laser_number=5, timestamp=1.7e9 + 0.125)]
    data = build(fields, [pts], point_step=32)
    dec = decode(Msg(fields, data, width=1, point_step=32))
    assert dec.intensity.tolist() == [0.25] and dec.ring.tolist() == [5]
    assert dec.time.tolist() == [1.7e9 + 0.125] and dec.time_field == 'timestamp'   # float: seconds, exact
    fields2 = [*XY, Field('z', 8, 7), Field('reflectivity', 12, 4)]
    dec2 = decode(Msg(fields2, build(fields2, [pts], point_step=16), width=1, point_step=16))
    assert dec2.intensity.tolist() == [7.0] and dec2.time is None and dec2.ring is None


def test_float64_beyond_float32_range_is_dropped_not_inf():
    fields = [Field('x', 0, 8), Field('y', 8, 8), Field('z', 16, 8)]
    pts = [dict(x=1e300, y=0.0, z=0.0), dict(x=1.0, y=2.0, z=3.0)]
    dec = decode(Msg(fields, build(fields, [pts], point_step=24), width=2, point_step=24))
    assert dec.indices.tolist() == [1] and dec.xyz.tolist() == [[1.0, 2.0, 3.0]]


def test_empty_clouds():
    fields = [*XY, Field('z', 8, 7), Field('intensity', 12, 7)]
    for width, height in ((0, 1), (5, 0), (0, 0)):
        dec = decode(Msg(fields, b'', width=width, height=height, point_step=16, row_step=16 * width))
        assert dec.xyz.shape == (0, 3) and dec.indices.shape == (0,) and dec.intensity.shape == (0,)
        assert dec.n_input == 0


@pytest.mark.parametrize('container', ['bytes', 'bytearray', 'array', 'memoryview', 'numpy', 'strided_mv'])
def test_data_containers(container):
    rng = np.random.default_rng(1)
    pts = rng.standard_normal((50, 4)).astype(np.float32)
    pts[3, 1] = np.nan
    raw = pts.tobytes()
    data = {'bytes': raw, 'bytearray': bytearray(raw), 'array': array.array('B', raw),
            'memoryview': memoryview(raw), 'numpy': np.frombuffer(raw, np.uint8).copy(),
            'strided_mv': memoryview(np.repeat(np.frombuffer(raw, np.uint8), 2))[::2]}[container]
    fields = [*XY, Field('z', 8, 7), Field('intensity', 12, 7)]
    dec = decode(Msg(fields, data, width=50, point_step=16))
    keep = np.arange(50) != 3
    np.testing.assert_array_equal(dec.xyz, pts[keep, :3])
    np.testing.assert_array_equal(dec.intensity, pts[keep, 3])
    np.testing.assert_array_equal(dec.indices, np.flatnonzero(keep))


def test_fast_path_is_zero_copy_and_copy_flag_owns():
    pts = np.arange(40, dtype=np.float32).reshape(10, 4)
    data = array.array('B', pts.tobytes())
    fields = [*XY, Field('z', 8, 7), Field('intensity', 12, 7)]
    msg = Msg(fields, data, width=10, point_step=16)
    dec = decode(msg)
    buf = np.frombuffer(data, np.uint8)
    assert np.shares_memory(dec.xyz, buf) and np.shares_memory(dec.intensity, buf)
    np.testing.assert_array_equal(dec.xyz, pts[:, :3])
    owned = decode(msg, copy=True)
    assert not np.shares_memory(owned.xyz, buf) and owned.xyz.flags.c_contiguous and owned.xyz.flags.writeable
    assert not np.shares_memory(owned.intensity, buf)
    np.testing.assert_array_equal(owned.xyz, pts[:, :3])
    # a read-only buffer gives read-only views rather than silently copying
    assert not decode(Msg(fields, bytes(data), width=10, point_step=16)).xyz.flags.writeable


# ----------------------------------------------------------------- sensor_msgs_py semantics

def test_matches_read_points_reference_on_real_lidar():
    """KITTI sweep (real data) packed like a Velodyne driver, with NaNs injected, big-endian too."""
    from pathlib import Path
    path = (Path(__file__).resolve().parents[1]
            / 'data/samples/kitti_raw_sfnd_seq/velodyne_points/data/0000000000.bin')
    pts = np.fromfile(path, dtype='<f4').reshape(-1, 4)[:20000]
    rng = np.random.default_rng(0)
    n = len(pts)
    for bigendian in (False, True):
        order = '>' if bigendian else '<'
        rec = np.zeros(n, dtype=np.dtype({'names': ['x', 'y', 'z', 'intensity', 'ring', 'time'],
                                          'formats': [order + 'f4'] * 4 + [order + 'u2', order + 'f4'],
                                          'offsets': [0, 4, 8, 16, 20, 24], 'itemsize': 32}))
        for i, name in enumerate(['x', 'y', 'z', 'intensity']):
            rec[name] = pts[:, i]
        rec['ring'] = rng.integers(0, 64, n)
        rec['time'] = np.linspace(0, 0.1, n)
        rec['y'][rng.choice(n, 300, replace=False)] = np.nan
        fields = [*XY, Field('z', 8, 7), Field('intensity', 16, 7),
                  Field('ring', 20, 4), Field('time', 24, 7)]
        msg = Msg(fields, rec.tobytes(), width=n, point_step=32, bigendian=bigendian)
        ref, ref_idx = ref_read_points(msg, ('x', 'y', 'z'), skip_nans=True)
        dec = decode(msg)
        np.testing.assert_array_equal(dec.indices, ref_idx)
        np.testing.assert_array_equal(dec.xyz, np.stack([ref['x'], ref['y'], ref['z']], 1).astype(np.float32))
        full, _ = ref_read_points(msg)
        np.testing.assert_array_equal(dec.intensity, full['intensity'][ref_idx])
        np.testing.assert_array_equal(dec.ring, full['ring'][ref_idx])
        np.testing.assert_array_equal(dec.time, full['time'][ref_idx].astype(np.float64))


# ------------------------------------------------------------ property tests: random layouts

EXTRA_NAMES = ['intensity', 'reflectivity', 't', 'time', 'offset_ns', 'ring', 'laser_number', 'rgb', 'normal']


def _value(datatype):
    if datatype in INT_RANGE:
        return st.integers(*INT_RANGE[datatype])
    width = 32 if datatype == 7 else 64
    return st.one_of(st.floats(width=width, allow_nan=True, allow_infinity=True),
                     st.floats(-1e4, 1e4, width=width))


@st.composite
def random_clouds(draw):
    extras = draw(st.lists(st.sampled_from(EXTRA_NAMES), unique=True, max_size=4))
    names = draw(st.permutations(['x', 'y', 'z'] + extras))
    fields, offset = [], draw(st.integers(0, 5))
    for name in names:
        if name in ('ring', 'laser_number'):
            datatype = draw(st.integers(1, 6))
        else:
            datatype = draw(st.integers(1, 8))
        count = draw(st.integers(1, 3)) if name in ('rgb', 'normal') else 1
        fields.append(Field(name, offset, datatype, count))
        offset += SIZE[datatype] * count + draw(st.integers(0, 4))
    point_step = offset + draw(st.integers(0, 6))
    height, width = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    row_step = width * point_step + (draw(st.integers(0, 9)) if draw(st.booleans()) else 0)
    bigendian = draw(st.booleans())
    scalar = [f for f in fields if f.count == 1]
    rows = [[{f.name: draw(_value(f.datatype)) for f in scalar} for _ in range(width)] for _ in range(height)]
    fill = draw(st.integers(0, 255))
    data = build(fields, rows, point_step=point_step, row_step=row_step, bigendian=bigendian, fill=fill)
    return fields, data, dict(width=width, height=height, point_step=point_step, row_step=row_step,
                              bigendian=bigendian)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_clouds(), st.sampled_from(['bytes', 'array', 'numpy']))
def test_random_layouts_match_brute_force(cloud, container):
    fields, data, geo = cloud
    data_obj = {'bytes': data, 'array': array.array('B', data),
                'numpy': np.frombuffer(data, np.uint8)}[container]
    msg = Msg(fields, data_obj, width=geo['width'], height=geo['height'], point_step=geo['point_step'],
              row_step=geo['row_step'], bigendian=geo['bigendian'])
    with np.errstate(over='ignore'):
        exp = brute_force(fields, data, **geo)
    extra = [f.name for f in fields if f.count == 1 and f.name not in 'xyz']
    dec = decode(msg, extra_fields=extra)
    assert_matches(dec, exp)
    order = '>' if geo['bigendian'] else '<'
    for f in fields:
        if f.name in extra:
            base = [r * geo['row_step'] + c * geo['point_step'] + f.offset
                    for r in range(geo['height']) for c in range(geo['width'])]
            want = [struct.unpack_from(order + STRUCT[f.datatype], data, b)[0] for b in base]
            want = np.array(want, dtype=_REF_NUMPY[f.datatype])[exp['indices']]
            assert dec.extra[f.name].dtype == want.dtype
            np.testing.assert_array_equal(dec.extra[f.name], want, err_msg=f.name)
    if geo['row_step'] == geo['width'] * geo['point_step']:
        ref, ref_idx = ref_read_points(msg, ('x', 'y', 'z'), skip_nans=True)
        with np.errstate(over='ignore', invalid='ignore'):
            ref_xyz = np.stack([ref['x'], ref['y'], ref['z']], 1).astype(np.float32).reshape(-1, 3)
        finite = np.isfinite(ref_xyz).all(1)   # read_points keeps +-inf, we drop them
        np.testing.assert_array_equal(dec.indices, ref_idx[finite])
        np.testing.assert_array_equal(dec.xyz, ref_xyz[finite])


# --------------------------------------------------------------------------------- bad input

def _good():
    fields = [*XY, Field('z', 8, 7), Field('intensity', 12, 7)]
    return Msg(fields, bytes(16 * 6), width=3, height=2, point_step=16)


def _with(**changes):
    msg = _good()
    for key, value in changes.items():
        setattr(msg, key, value)
    return msg


@pytest.mark.parametrize('msg, words', [
    (_with(fields=[*XY, Field('intensity', 12, 7)]), ["no field 'z'", "'x', 'y'"]),
    (_with(fields=[*XY, Field('z', 8, 7), Field('intensity', 14, 7)]),
     ["'intensity'", 'ends at byte 18', 'point_step is 16']),
    (_with(point_step=10, row_step=30, data=bytes(60)), ["'z'", 'ends at byte 12', 'point_step is 10']),
    (_with(data=bytes(95)), ['95 bytes', 'row_step 48 x height 2 = 96']),
    (_with(data=bytes(97)), ['97 bytes', '= 96']),
    (_with(row_step=50), ['100', 'row_step 50 x height 2']),
    (_with(row_step=40, data=bytes(80)), ['row_step is 40', 'width 3 x point_step 16 = 48']),
    (_with(fields=[*XY, Field('z', 8, 9)]), ["'z'", 'datatype 9', '7 (FLOAT32)']),
    (_with(fields=[*XY, Field('z', 8, 7), Field('w', 12, 0)]),
     ["'w'", 'datatype 0']),
    (_with(fields=[Field('x', 0, 7, 3), Field('y', 4, 7), Field('z', 8, 7)]),
     ["'x'", 'count 3', 'expected count 1']),
    (_with(fields=[Field('x', 0, 7), Field('y', 4, 7, 0), Field('z', 8, 7)]), ["'y'", 'count 0']),
    (_with(fields=[*XY, Field('z', 8, 7), Field('intensity', 12, 2, 4)]), ["'intensity'", 'count 4']),
    (_with(fields=[*XY, Field('z', 8, 7), Field('x', 12, 7)]), ["'x'", 'twice']),
    (_with(fields=[*XY, Field('z', 8, 7), Field('ring', 12, 7)]),
     ["'ring'", 'FLOAT32', 'integer']),
    (_with(data=[0] * 96), ['list', 'bytes']),
    (_with(data=np.zeros(24, np.float32)), ['float32', 'uint8']),
    (_with(width=-3), ['width', 'non-negative']),
    (_with(height=1.5), ['height', 'non-negative']),
    (types.SimpleNamespace(height=1, width=1), ['no attribute', 'point_step']),
])
def test_bad_input_raises_clear_error(msg, words):
    with pytest.raises(CloudError) as info:
        decode(msg)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert isinstance(info.value, ValueError)


def test_extra_fields_errors():
    fields = [*XY, Field('z', 8, 7), Field('normal', 12, 7, 3)]
    msg = Msg(fields, bytes(24 * 2), width=2, point_step=24)
    with pytest.raises(CloudError, match=r"extra field 'rgb' is not in the cloud \(fields: 'x', 'y'"):
        decode(msg, extra_fields=['rgb'])
    with pytest.raises(CloudError, match="'normal' has count 3"):
        decode(msg, extra_fields=['normal'])
    empty = decode(Msg(fields[:3] + [Field('label', 12, 4)], b'', width=0, point_step=16),
                   extra_fields=['label'])
    assert empty.extra['label'].dtype == np.uint16 and empty.extra['label'].shape == (0,)


def test_max_points():
    msg = _good()
    assert len(decode(msg, max_points=6)) == 6
    with pytest.raises(CloudError, match=r'6 points \(3 x 2\).*max_points=5'):
        decode(msg, max_points=5)


# ------------------------------------------------------------------------------------- encode

def test_encode_buffer_layout_against_struct():
    xyz = np.array([[1, 2, 3], [4, 5, 6]], np.float64)
    fields = {'flow_x': np.float32([0.5, -0.5]), 'flow_y': np.float32([1, 2]), 'flow_z': np.float32([3, 4]),
              'speed': np.float32([9, 8]), 'is_dynamic': np.array([True, False])}
    spec, data, point_step = encode_buffer(xyz, fields)
    assert spec == [('x', 0, 7, 1), ('y', 4, 7, 1), ('z', 8, 7, 1), ('flow_x', 12, 7, 1),
                    ('flow_y', 16, 7, 1), ('flow_z', 20, 7, 1), ('speed', 24, 7, 1), ('is_dynamic', 28, 2, 1)]
    assert point_step == 32 and data.dtype == np.uint8
    expected = b''.join(struct.pack('<7fB3x', *xyz[i], fields['flow_x'][i], fields['flow_y'][i],
                                    fields['flow_z'][i], fields['speed'][i], int(fields['is_dynamic'][i]))
                        for i in range(2))
    assert data.tobytes() == expected   # padding is zero, not heap garbage


def test_encode_buffer_alignment_of_mixed_types():
    xyz = np.zeros((3, 3), np.float32)
    spec, data, point_step = encode_buffer(xyz, {'a': np.uint8([1, 2, 3]), 'b': np.float64([1, 2, 3]),
                                                 'c': np.int16([-1, 0, 1])})
    assert spec[3:] == [('a', 12, 2, 1), ('b', 16, 8, 1), ('c', 24, 3, 1)]
    assert point_step == 32 and data.size == 96
    assert struct.unpack_from('<d', data, 32 + 16)[0] == 2.0 and struct.unpack_from('<h', data, 24)[0] == -1


@pytest.mark.parametrize('xyz, fields, words', [
    (np.zeros((4, 2)), {}, ['xyz', '(N, 3)']),
    (np.zeros((4, 3)), {'flow_x': np.zeros(3)}, ["'flow_x'", '(4,)']),
    (np.zeros((4, 3)), {'id': np.zeros(4, np.int64)}, ["'id'", 'int64']),
    (np.zeros((4, 3)), {'x': np.zeros(4)}, ["'x'", 'reserved']),
    (np.zeros((4, 3)), {'': np.zeros(4)}, ['non-empty']),
    (np.array([['a', 'b', 'c']]), {}, ['xyz', 'dtype']),
])
def test_encode_bad_input(xyz, fields, words):
    with pytest.raises(CloudError) as info:
        encode_buffer(xyz, fields)
    for word in words:
        assert word in str(info.value)


def _roundtrip_arrays(n=1000, seed=0):
    rng = np.random.default_rng(seed)
    xyz = rng.uniform(-80, 80, (n, 3)).astype(np.float32)
    fields = {name: rng.standard_normal(n).astype(np.float32) for name in ('flow_x', 'flow_y', 'flow_z')}
    fields.update({'speed': rng.random(n).astype(np.float32),
                   'is_dynamic': rng.random(n) > 0.5})
    return xyz, fields


def _fields_of(msg, buf_values):
    """Read every encoded field back with the reference read_points."""
    pts, _ = ref_read_points(msg)
    return {name: pts[name] for name in buf_values}


def test_encode_rclpy_message_roundtrip():
    pytest.importorskip('sensor_msgs.msg')
    from rclpy.serialization import deserialize_message, serialize_message
    from sensor_msgs.msg import PointCloud2
    xyz, fields = _roundtrip_arrays()
    xyz[7, 0] = np.nan
    msg = encode(xyz, fields, frame_id='base_link', stamp_ns=1_700_000_000_123_456_789)
    assert isinstance(msg, PointCloud2) and isinstance(msg.data, array.array)
    assert (msg.height, msg.width, msg.point_step, msg.row_step) == (1, 1000, 32, 32000)
    stamp = msg.header.stamp
    assert (msg.header.frame_id, stamp.sec, stamp.nanosec) == ('base_link', 1_700_000_000, 123_456_789)
    assert msg.is_dense is False and msg.is_bigendian is False
    back = deserialize_message(serialize_message(msg), PointCloud2)   # real CDR, as on the wire
    got = _fields_of(back, fields)
    for name, values in fields.items():
        np.testing.assert_array_equal(got[name], values.astype(got[name].dtype), err_msg=name)
    dec = decode(back)
    keep = np.arange(1000) != 7
    np.testing.assert_array_equal(dec.xyz, xyz[keep])
    np.testing.assert_array_equal(dec.indices, np.flatnonzero(keep))
    assert dec.stamp_ns == 1_700_000_000_123_456_789 and dec.frame_id == 'base_link'
    # an existing header is reused as is
    again = encode(xyz[:3], header=back.header)
    assert again.header == back.header and again.width == 3 and again.point_step == 12
    with pytest.raises(CloudError, match='either header'):
        encode(xyz, header=back.header, frame_id='map')


def test_encode_rosbags_message_roundtrip():
    from rosbags.typesys import Stores, get_typestore
    store = get_typestore(Stores.ROS2_KILTED)
    cls = store.types['sensor_msgs/msg/PointCloud2']
    xyz, fields = _roundtrip_arrays(seed=2)
    msg = encode(xyz, fields, frame_id='lidar', stamp_ns=-1, msg_cls=cls)
    assert type(msg) is cls and isinstance(msg.data, np.ndarray) and msg.is_dense is True
    assert (msg.header.stamp.sec, msg.header.stamp.nanosec) == (-1, 999_999_999)
    back = store.deserialize_cdr(store.serialize_cdr(msg, cls.__msgtype__), cls.__msgtype__)
    dec = decode(back)
    np.testing.assert_array_equal(dec.xyz, xyz)
    assert dec.stamp_ns == -1 and dec.frame_id == 'lidar'
    got = _fields_of(back, fields)
    np.testing.assert_array_equal(got['is_dynamic'], fields['is_dynamic'].astype(np.uint8))
    np.testing.assert_array_equal(got['speed'], fields['speed'])


def test_stamp_helpers():
    pytest.importorskip('builtin_interfaces.msg')
    for ns in (0, 1, 999_999_999, 1_000_000_000, 1_700_000_000_000_000_001, -1, -1_500_000_000):
        stamp = ns_to_stamp(ns)
        assert 0 <= stamp.nanosec < 10 ** 9
        assert stamp_to_ns(stamp) == ns
    assert stamp_to_ns(types.SimpleNamespace(sec=3, nanosec=5)) == 3_000_000_005
    with pytest.raises(CloudError, match='sec and nanosec'):
        stamp_to_ns(object())


# ------------------------------------------------------------------------ real DDS round trip

@pytest.mark.ros
def test_dds_publish_subscribe_100k(rclpy_context):
    import rclpy
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import PointCloud2

    from zeroflow_ros.testing import spin_until, wait_for_matched

    rng = np.random.default_rng(3)
    n = 100_000
    src = np.zeros(n, dtype=np.dtype({'names': ['x', 'y', 'z', 'intensity'], 'formats': ['<f4'] * 4,
                                      'offsets': [0, 4, 8, 12], 'itemsize': 16}))
    xyz = rng.uniform(-100, 100, (n, 3)).astype(np.float32)
    xyz[rng.choice(n, 1000, replace=False), 2] = np.nan
    for i, a in enumerate('xyz'):
        src[a] = xyz[:, i]
    src['intensity'] = rng.random(n).astype(np.float32)
    received: list = []
    node = rclpy.create_node('pc2_codec_test', context=rclpy_context)
    try:
        qos = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE)
        pub = node.create_publisher(PointCloud2, 'cloud_in', qos)
        sub = node.create_subscription(PointCloud2, 'cloud_in', received.append, qos)
        wait_for_matched(pub)
        wait_for_matched(sub)
        fields = {'intensity': src['intensity'], 'speed': np.linalg.norm(np.nan_to_num(xyz), axis=1)}
        msg = encode(xyz, fields, frame_id='lidar', stamp_ns=42_000_000_007)
        pub.publish(msg)
        spin_until(node, lambda: received, timeout=15)
    finally:
        node.destroy_node()
    got = received[0]
    assert bytes(got.data) == bytes(msg.data)
    dec = decode(got)
    keep = np.isfinite(xyz).all(1)
    np.testing.assert_array_equal(dec.indices, np.flatnonzero(keep))
    np.testing.assert_array_equal(dec.xyz, xyz[keep])
    np.testing.assert_array_equal(dec.intensity, src['intensity'][keep])
    assert dec.stamp_ns == 42_000_000_007 and dec.n_input == n


@pytest.mark.ros
def test_wait_helpers_time_out_clearly(rclpy_context):
    import rclpy
    from std_msgs.msg import String

    from zeroflow_ros.testing import spin_until, wait_for, wait_for_matched
    assert wait_for(lambda: True, 0.0) and not wait_for(lambda: False, 0.05)
    node = rclpy.create_node('pc2_wait_test', context=rclpy_context)
    try:
        pub = node.create_publisher(String, 'nobody_listens', 1)
        with pytest.raises(TimeoutError, match='nobody_listens: 0 of 1 subscriptions'):
            wait_for_matched(pub, timeout=0.3)
        with pytest.raises(TimeoutError):
            spin_until(node, lambda: False, timeout=0.2)
    finally:
        node.destroy_node()


# -------------------------------------------------------------------- more edge cases

def test_padding_with_nan_bit_patterns_does_not_drop_finite_points():
    # 0xFF padding reads as NaN when the whole buffer is scanned as float32: the exact per-column
    # check must still keep every point.
    fields = [*XY, Field('z', 8, 7)]
    pts = [dict(x=float(i), y=1.0, z=2.0) for i in range(5)]
    data = build(fields, [pts], point_step=16, fill=0xFF)
    dec = decode(Msg(fields, data, width=5, point_step=16))
    assert dec.indices.tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(dec.xyz[:, 0], np.arange(5, dtype=np.float32))


@pytest.mark.parametrize('x_offset, point_step', [(1, 17), (2, 15), (4, 16)])
def test_unaligned_float32_xyz(x_offset, point_step):
    fields = [Field('x', x_offset, 7), Field('y', x_offset + 4, 7), Field('z', x_offset + 8, 7)]
    pts = [dict(x=0.5 * i, y=-1.0 * i, z=3.0) for i in range(7)]
    pts[2]['y'] = float('nan')
    data = build(fields, [pts], point_step=point_step)
    for container in (data, np.frombuffer(b'\0' + data, np.uint8)[1:]):   # also an odd buffer address
        dec = decode(Msg(fields, container, width=7, point_step=point_step))
        assert_matches(dec, brute_force(fields, data, width=7, height=1, point_step=point_step,
                                        row_step=7 * point_step, bigendian=False))


def test_indices_are_read_only_and_scatter_checks_shape():
    fields = [*XY, Field('z', 8, 7)]
    dec = decode(Msg(fields, np.zeros(12 * 4, np.uint8), width=4, point_step=12))
    assert dec.indices.tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        dec.indices[0] = 5    # shared cached arange must not be corrupted by callers
    again = decode(Msg(fields, np.zeros(12 * 4, np.uint8), width=4, point_step=12))
    assert again.indices.tolist() == [0, 1, 2, 3]
    with pytest.raises(CloudError, match=r'expected \(4, \.\.\.\)'):
        dec.scatter(np.zeros(3))


def test_encode_empty_cloud_roundtrip():
    pytest.importorskip('sensor_msgs.msg')
    msg = encode(np.zeros((0, 3), np.float32), {'speed': np.zeros(0, np.float32)})
    assert (msg.width, msg.row_step, len(msg.data), msg.point_step) == (0, 0, 0, 16)
    dec = decode(msg)
    assert dec.xyz.shape == (0, 3) and dec.n_input == 0


_ENCODABLE = [np.bool_, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.float16, np.float32,
              np.float64]


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 12), st.lists(st.sampled_from(range(len(_ENCODABLE))), max_size=6),
       st.integers(0, 2 ** 32 - 1))
def test_encode_random_fields_read_back_by_reference(n, kinds, seed):
    rng = np.random.default_rng(seed)
    xyz = rng.uniform(-1e3, 1e3, (n, 3))
    fields = {}
    for i, k in enumerate(kinds):
        t = np.dtype(_ENCODABLE[k])
        if t.kind == 'f':
            values = rng.uniform(-1e3, 1e3, n).astype(t)
        elif t.kind == 'b':
            values = rng.random(n) > 0.5
        else:
            info = np.iinfo(t)
            values = rng.integers(info.min, info.max, n, endpoint=True, dtype=t)
        fields[f'f{i}_{t.name}'] = values
    spec, data, point_step = encode_buffer(xyz, fields)
    sizes = {1: 1, 2: 1, 3: 2, 4: 2, 5: 4, 6: 4, 7: 4, 8: 8}
    ends = sorted((off, off + sizes[dt]) for _, off, dt, _ in spec)
    assert all(a[1] <= b[0] for a, b in zip(ends, ends[1:]))                  # no overlap
    assert all(off % sizes[dt] == 0 for _, off, dt, _ in spec)                 # natural alignment
    assert point_step % max(sizes[dt] for _, _, dt, _ in spec) == 0 and ends[-1][1] <= point_step
    assert data.size == n * point_step
    covered = np.zeros(point_step, bool)
    for lo, hi in ends:
        covered[lo:hi] = True
    assert not data.reshape(n, point_step)[:, ~covered].any()                 # padding is zero
    msg = Msg([Field(*f) for f in spec], data, width=n, point_step=point_step)
    ref, _ = ref_read_points(msg)
    np.testing.assert_array_equal(ref['x'], xyz[:, 0].astype(np.float32))
    for name, values in fields.items():
        expect = values.astype(np.uint8) if values.dtype == np.bool_ else values
        expect = expect.astype(np.float32) if values.dtype == np.float16 else expect
        assert ref[name].dtype == expect.dtype, name
        np.testing.assert_array_equal(ref[name], expect, err_msg=name)


def test_encode_rclpy_with_field_checks_enabled():
    """ROS_PYTHON_CHECK_FIELDS=1 makes rosidl validate every field type; run it in a fresh interpreter."""
    pytest.importorskip('sensor_msgs.msg')
    import os
    import subprocess
    code = ('import numpy as np\n'
            'from zeroflow_ros.core.pointcloud2 import encode, decode\n'
            'm = encode(np.ones((5, 3), np.float32), {"speed": np.arange(5, dtype=np.float32),\n'
            '           "is_dynamic": np.ones(5, bool)}, frame_id="f", stamp_ns=7)\n'
            'assert m._check_fields and decode(m).xyz.shape == (5, 3)\n')
    env = dict(os.environ, ROS_PYTHON_CHECK_FIELDS='1')
    out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_clouds(), st.sampled_from(['data', 'point_step', 'row_step', 'offset', 'width', 'height']),
       st.integers(-40, 40))
def test_corrupted_geometry_raises_cloud_error_or_decodes_correctly(cloud, what, delta):
    """Any inconsistent size field must give CloudError; a consistent one must decode like brute force."""
    fields, data, geo = cloud
    geo = dict(geo)
    if what == 'data':
        data = data[:max(0, len(data) + delta)] if delta < 0 else data + bytes(delta)
    elif what == 'offset':
        f = fields[0]
        fields = [Field(f.name, max(0, f.offset + delta), f.datatype, f.count)] + fields[1:]
    else:
        geo[what] = max(0, geo[what] + delta)
    msg = Msg(fields, data, width=geo['width'], height=geo['height'], point_step=geo['point_step'],
              row_step=geo['row_step'], bigendian=geo['bigendian'])
    try:
        dec = decode(msg)
    except CloudError:
        return
    # accepted: the geometry is self-consistent, so the brute-force reading must agree
    assert len(data) == geo['row_step'] * geo['height']
    assert all(f.offset + SIZE[f.datatype] * f.count <= geo['point_step'] for f in fields)
    with np.errstate(over='ignore'):
        assert_matches(dec, brute_force(fields, data, **geo))


def test_ros_domain_fixture_sets_local_discovery(ros_domain):
    import os
    assert os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] == 'LOCALHOST'
    assert os.environ['ROS_DOMAIN_ID'] == str(ros_domain) and 0 <= ros_domain <= 101


def test_unique_domain_id(monkeypatch):
    import os

    from zeroflow_ros.testing import unique_domain_id
    monkeypatch.delenv('ROS_DOMAIN_ID', raising=False)
    assert unique_domain_id() == os.getpid() % 100 + 1
    monkeypatch.setenv('ROS_DOMAIN_ID', '42')
    assert unique_domain_id() == 42
    monkeypatch.setenv('ROS_DOMAIN_ID', '300')
    with pytest.raises(ValueError, match='0..101'):
        unique_domain_id()
