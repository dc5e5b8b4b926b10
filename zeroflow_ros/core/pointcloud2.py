"""``sensor_msgs/PointCloud2`` <-> numpy, without ``sensor_msgs_py``.

The codec is message-class agnostic: it only reads and writes the attributes of the message
definition, so the same code serves rclpy messages (``data`` is ``array.array('B')``), rosbags
typestore messages (``data`` is a ``numpy.uint8`` array) and hand-built objects (``data`` may be
``bytes``, ``bytearray``, ``memoryview``...).

Reading
    :func:`decode` returns a :class:`DecodedCloud`: xyz as float32 plus the indices of the kept
    points in the input's ``width * height`` order, so any per-point output can be mapped back
    (:meth:`DecodedCloud.scatter`). Points with a non-finite x, y or z are dropped in one
    vectorised pass. When x, y, z are little-endian FLOAT32 at consecutive offsets and no point is
    dropped, ``xyz`` (and a FLOAT32 intensity) are zero-copy strided views of the message buffer
    (read-only if the buffer is; pass ``copy=True`` for owned, contiguous, writable arrays);
    ``indices`` is then a read-only slice of a cached ``arange``. Any other layout
    (arbitrary offsets, ``point_step``/``row_step`` padding, big-endian, any of the eight
    PointField datatypes, organised clouds) goes through per-field strided views, still without
    Python loops over points. x, y, z of any type are converted to float32, so FLOAT64 values
    beyond float32 range become inf and their points are dropped like NaN ones. Unlike
    ``sensor_msgs_py`` the finiteness check runs whatever ``is_dense`` claims, and ``row_step``
    padding is honoured.

Writing
    :func:`encode_buffer` packs xyz (FLOAT32 at 0, 4, 8) and extra per-point fields, each
    aligned to its own size, little-endian; :func:`encode` wraps it into a message of the chosen
    class (rclpy by default, imported lazily; or rosbags classes).

Bad input raises :class:`CloudError` (a ``ValueError``) naming the problem and what was
expected; nothing is silently skipped.
"""
from __future__ import annotations

import array
import logging
import sys
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = [
    'CloudError', 'DecodedCloud', 'decode', 'encode', 'encode_buffer', 'stamp_to_ns', 'ns_to_stamp',
    'DATATYPES', 'DATATYPE_NAMES', 'INTENSITY_NAMES', 'TIME_NAMES', 'RING_NAMES',
]

logger = logging.getLogger(__name__)

#: PointField datatype constant -> numpy type code (byte order is added from ``is_bigendian``).
DATATYPES: dict[int, str] = {1: 'i1', 2: 'u1', 3: 'i2', 4: 'u2', 5: 'i4', 6: 'u4', 7: 'f4', 8: 'f8'}
DATATYPE_NAMES: dict[int, str] = {
    1: 'INT8', 2: 'UINT8', 3: 'INT16', 4: 'UINT16', 5: 'INT32', 6: 'UINT32', 7: 'FLOAT32', 8: 'FLOAT64'}
_NUMPY_TO_DATATYPE: dict[np.dtype, int] = {np.dtype(code): dt for dt, code in DATATYPES.items()}

#: Field names looked up, in order of preference, for the optional per-point channels.
INTENSITY_NAMES: tuple[str, ...] = ('intensity', 'reflectivity')
TIME_NAMES: tuple[str, ...] = ('t', 'time', 'timestamp', 'offset_ns', 'offset_time')
RING_NAMES: tuple[str, ...] = ('ring', 'laser_number')

_NS_PER_S = 1_000_000_000


class CloudError(ValueError):
    """A PointCloud2 (or arrays to encode) is malformed; the message says what was expected."""


@dataclass
class DecodedCloud:
    """Points of one PointCloud2 with a finite x, y and z.

    ``indices[k]`` is the position of ``xyz[k]`` in the input's row-major ``width * height``
    order. ``time`` is in seconds: integer time fields are taken as nanoseconds (Ouster ``t``,
    Livox ``offset_time``), floating ones as seconds (Velodyne ``time``, Hesai ``timestamp``);
    ``time_field`` says which field it came from.
    """

    xyz: np.ndarray                     # (K, 3) float32
    indices: np.ndarray                 # (K,) int64
    n_input: int                        # width * height
    intensity: np.ndarray | None = None  # (K,) float32
    time: np.ndarray | None = None       # (K,) float64 seconds
    ring: np.ndarray | None = None       # (K,) int64
    frame_id: str = ''
    stamp_ns: int = 0
    height: int = 1
    width: int = 0
    time_field: str | None = None
    extra: dict[str, np.ndarray] = dataclass_field(default_factory=dict)  # from decode(extra_fields=)

    def __len__(self) -> int:
        return int(self.xyz.shape[0])

    @property
    def n_dropped(self) -> int:
        return self.n_input - len(self)

    def scatter(self, values: np.ndarray, fill: Any = 0) -> np.ndarray:
        """Map per-kept-point ``values`` (K, ...) back to input order (n_input, ...); dropped -> fill."""
        values = np.asarray(values)
        if values.shape[:1] != (len(self),):
            raise CloudError(f'scatter: values have shape {values.shape}, expected ({len(self)}, ...) '
                             'one row per decoded point')
        out = np.full((self.n_input,) + values.shape[1:], fill, dtype=values.dtype)
        out[self.indices] = values
        return out


# ----------------------------------------------------------------------------------- helpers

def stamp_to_ns(stamp: Any) -> int:
    """``builtin_interfaces/Time``-like object (``sec``, ``nanosec``) -> integer nanoseconds."""
    try:
        sec, nanosec = int(stamp.sec), int(stamp.nanosec)
    except (AttributeError, TypeError, ValueError):
        raise CloudError(f'stamp {stamp!r}: expected an object with integer attributes sec and nanosec'
                         ) from None
    return sec * _NS_PER_S + nanosec


def ns_to_stamp(ns: int, time_cls: type | None = None) -> Any:
    """Integer nanoseconds -> ``time_cls(sec=..., nanosec=...)`` (default: rclpy's builtin_interfaces Time).

    Negative times keep ``0 <= nanosec < 1e9`` as ROS requires (floor division).
    """
    if time_cls is None:
        from builtin_interfaces.msg import Time as time_cls  # lazy: rclpy is optional
    sec, nanosec = divmod(int(ns), _NS_PER_S)
    return time_cls(sec=sec, nanosec=nanosec)


def _attr(msg: Any, name: str, what: str = 'PointCloud2') -> Any:
    try:
        return getattr(msg, name)
    except AttributeError:
        raise CloudError(f'{what} {type(msg).__name__} has no attribute {name!r}') from None


def _uint(msg: Any, name: str) -> int:
    value = _attr(msg, name)
    try:
        ivalue = int(value)
    except (TypeError, ValueError):
        raise CloudError(f'PointCloud2.{name} = {value!r}: expected a non-negative integer') from None
    if ivalue != value or ivalue < 0:
        raise CloudError(f'PointCloud2.{name} = {value!r}: expected a non-negative integer')
    return ivalue


def _as_bytes_array(data: Any) -> np.ndarray:
    """Zero-copy uint8 view of the message buffer."""
    if isinstance(data, np.ndarray):
        if data.dtype.itemsize != 1 or data.dtype.kind not in 'uiSVb':
            raise CloudError(f'PointCloud2.data is a numpy array of dtype {data.dtype}: expected uint8')
        if data.ndim != 1:
            raise CloudError(f'PointCloud2.data has shape {data.shape}: expected a 1-D byte array')
        return data.view(np.uint8) if data.flags.c_contiguous else np.ascontiguousarray(data).view(np.uint8)
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except (TypeError, ValueError, BufferError) as exc:
        if isinstance(data, memoryview):  # non-contiguous views: one copy is still correct
            return np.frombuffer(data.tobytes(), dtype=np.uint8)
        raise CloudError(f'PointCloud2.data is a {type(data).__name__}: expected bytes, bytearray, '
                         f"array.array('B'), memoryview or a numpy uint8 array ({exc})") from None


@dataclass(frozen=True)
class _Field:
    name: str
    offset: int
    datatype: int
    count: int

    @property
    def size(self) -> int:
        return np.dtype(DATATYPES[self.datatype]).itemsize


def _parse_fields(raw_fields: Any, point_step: int) -> dict[str, _Field]:
    try:
        items = list(raw_fields)
    except TypeError:
        raise CloudError(f'PointCloud2.fields = {raw_fields!r}: expected a list of PointField') from None
    fields: dict[str, _Field] = {}
    for i, f in enumerate(items):
        what = f'PointCloud2.fields[{i}]'
        name = _attr(f, 'name', what)
        try:
            offset, datatype, count = int(_attr(f, 'offset', what)), int(_attr(f, 'datatype', what)), \
                int(_attr(f, 'count', what))
        except (TypeError, ValueError):
            raise CloudError(f'{what} ({name!r}): offset, datatype and count must be integers') from None
        if datatype not in DATATYPES:
            known = ', '.join(f'{k} ({v})' for k, v in DATATYPE_NAMES.items())
            raise CloudError(f'field {name!r} has datatype {datatype}: expected one of {known}')
        if offset < 0 or count < 0:
            raise CloudError(f'field {name!r} has offset {offset}, count {count}: '
                             'expected non-negative values')
        field = _Field(str(name), offset, datatype, count)
        end = offset + field.size * count
        if end > point_step:
            raise CloudError(
                f'field {name!r} (offset {offset}, {DATATYPE_NAMES[datatype]} x{count}) ends at byte {end} '
                f'but point_step is {point_step}: expected point_step >= {end}')
        if field.name in fields and field.name:
            raise CloudError(f'field {name!r} appears twice in PointCloud2.fields: expected unique names')
        fields[field.name] = field
    for axis in ('x', 'y', 'z'):
        if axis not in fields:
            have = ', '.join(repr(n) for n in fields) or 'none'
            raise CloudError(f"PointCloud2 has no field {axis!r} (fields: {have}): expected 'x', 'y' and 'z'")
        if fields[axis].count != 1:
            raise CloudError(f'field {axis!r} has count {fields[axis].count}: expected count 1')
    return fields


def _pick(fields: Mapping[str, _Field], names: Sequence[str]) -> _Field | None:
    for name in names:
        field = fields.get(name)
        if field is not None:
            if field.count != 1:
                raise CloudError(f'field {name!r} has count {field.count}: expected count 1')
            return field
    return None


class _Layout:
    """Strided views of single fields into the byte buffer."""

    def __init__(self, buf: np.ndarray, height: int, width: int, point_step: int, row_step: int,
                 bigendian: bool) -> None:
        self.buf, self.height, self.width = buf, height, width
        self.point_step, self.row_step = point_step, row_step
        self.order = '>' if bigendian else '<'
        # Rows back to back: the cloud is one flat run of points, so every view can be 1-D.
        self.flat = height <= 1 or row_step == width * point_step

    def view(self, field: _Field) -> np.ndarray:
        """(N,) view when rows are contiguous, else (height, width)."""
        dtype = np.dtype(self.order + DATATYPES[field.datatype])
        if self.flat:
            return np.ndarray((self.height * self.width,), dtype, buffer=self.buf, offset=field.offset,
                              strides=(self.point_step,))
        return np.ndarray((self.height, self.width), dtype, buffer=self.buf, offset=field.offset,
                          strides=(self.row_step, self.point_step))

    def column(self, field: _Field, dtype: np.dtype, keep: np.ndarray | None) -> np.ndarray:
        """Field as a 1-D ``dtype`` array of the kept points (a view when nothing needs changing)."""
        view = self.view(field)
        if view.ndim == 2:
            view = view.reshape(-1)  # copies: rows are padded
        if keep is not None:
            view = view[keep]
        with np.errstate(over='ignore'):  # a FLOAT64 channel beyond float32 range becomes inf, as in C
            return view.astype(dtype, copy=False)


def _finite_mask(xyz: np.ndarray) -> np.ndarray | None:
    """Mask of rows with finite x, y, z; None when all are (the common case, no allocation later).

    Column-wise on purpose: numpy reductions along a length-3 axis of a strided view are ~20x
    slower than three 1-D passes.
    """
    if xyz.dtype.kind != 'f':
        return None
    keep = np.isfinite(xyz[:, 0])
    keep &= np.isfinite(xyz[:, 1])
    keep &= np.isfinite(xyz[:, 2])
    return None if keep.all() else keep


def _buffer_all_finite(buf: np.ndarray, xyz: np.ndarray) -> bool:
    """Return True if every float32 word of the whole buffer is finite (then so are x, y, z).

    One contiguous SIMD pass beats three strided ones ~2x. Other fields or padding that happen
    to hold a NaN/inf bit pattern only make this say False, and the caller then runs the exact
    per-column check, so the answer is never wrong.
    """
    if buf.size % 4 or xyz.strides[0] % 4 or not xyz.flags.aligned or buf.ctypes.data % 4:
        return False
    if xyz.strides[0] > 32:  # wide points: scanning all their words costs more than it saves
        return False
    return bool(np.isfinite(buf.view(np.float32)).all())


_ARANGE = np.arange(0, dtype=np.int64)
_ARANGE_CACHE_MAX = 1 << 22  # 32 MiB of int64 at most; bigger clouds get a fresh arange


def _arange(n: int) -> np.ndarray:
    """Read-only ``arange(n)`` sliced from a cached one: the all-kept indices cost nothing per frame."""
    global _ARANGE
    if n > _ARANGE_CACHE_MAX:
        return np.arange(n, dtype=np.int64)
    if _ARANGE.size < n:
        grown = np.arange(min(max(n, 2 * _ARANGE.size), _ARANGE_CACHE_MAX), dtype=np.int64)
        grown.flags.writeable = False
        _ARANGE = grown  # a swap, not an in-place resize: views handed out earlier stay valid
    return _ARANGE[:n]


def _gather_rows(xyz: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
    """Contiguous float32 copy of the kept rows of an (N, 3) array, one 1-D pass per column."""
    n_out = xyz.shape[0] if keep is None else int(np.count_nonzero(keep))
    out = np.empty((n_out, 3), np.float32)
    for c in range(3):
        out[:, c] = xyz[:, c] if keep is None else xyz[:, c][keep]
    return out


# ------------------------------------------------------------------------------------ decode

def decode(msg: Any, max_points: int | None = None, *, copy: bool = False,
           extra_fields: Sequence[str] = ()) -> DecodedCloud:
    """Decode a PointCloud2-like message (see module doc); raises :class:`CloudError` on bad input.

    ``max_points``: clouds with more than this many input points (``width * height``) are
    rejected before any data is touched; the caller decides whether to clip.
    ``copy``: return owned, C-contiguous, writable arrays even where a view would do.
    ``extra_fields``: names of further count-1 fields to return in ``DecodedCloud.extra``, in
    their own type (native byte order), for the kept points; a missing name is an error.
    """
    height, width = _uint(msg, 'height'), _uint(msg, 'width')
    point_step, row_step = _uint(msg, 'point_step'), _uint(msg, 'row_step')
    n = height * width
    if max_points is not None and n > max_points:
        raise CloudError(f'cloud has {n} points ({width} x {height}): '
                         f'expected at most max_points={max_points}')
    fields = _parse_fields(_attr(msg, 'fields'), point_step)
    bigendian = bool(_attr(msg, 'is_bigendian'))
    header = _attr(msg, 'header')
    frame_id = str(_attr(header, 'frame_id', 'header'))
    stamp_ns = stamp_to_ns(_attr(header, 'stamp', 'header'))

    if height > 0 and row_step < width * point_step:
        raise CloudError(f'row_step is {row_step} but width {width} x point_step {point_step} = '
                         f'{width * point_step}: expected row_step >= width * point_step')
    buf = _as_bytes_array(_attr(msg, 'data'))
    if buf.size != row_step * height:
        raise CloudError(f'data has {buf.size} bytes: expected row_step {row_step} x height {height} = '
                         f'{row_step * height} (width {width}, point_step {point_step})')

    f_int, f_time = _pick(fields, INTENSITY_NAMES), _pick(fields, TIME_NAMES)
    f_ring = _pick(fields, RING_NAMES)
    f_extra = []
    for name in extra_fields:
        if name not in fields:
            have = ', '.join(repr(n) for n in fields)
            raise CloudError(f'extra field {name!r} is not in the cloud (fields: {have})')
        f_extra.append(_pick(fields, (name,)))
    if f_ring is not None and DATATYPES[f_ring.datatype][0] == 'f':
        raise CloudError(f'field {f_ring.name!r} is {DATATYPE_NAMES[f_ring.datatype]}: expected an integer '
                         'datatype for a ring / laser number')
    if n == 0:
        empty = np.empty(0)
        return DecodedCloud(
            xyz=np.empty((0, 3), np.float32), indices=np.empty(0, np.int64), n_input=0,
            intensity=None if f_int is None else empty.astype(np.float32),
            time=None if f_time is None else empty.astype(np.float64),
            ring=None if f_ring is None else empty.astype(np.int64),
            frame_id=frame_id, stamp_ns=stamp_ns, height=height, width=width,
            time_field=None if f_time is None else f_time.name,
            extra={f.name: np.empty(0, DATATYPES[f.datatype]) for f in f_extra})

    layout = _Layout(buf, height, width, point_step, row_step, bigendian)
    fx, fy, fz = fields['x'], fields['y'], fields['z']
    fast = (layout.flat and not bigendian and fx.datatype == fy.datatype == fz.datatype == 7
            and fy.offset == fx.offset + 4 and fz.offset == fx.offset + 8)
    if fast:
        # One (N, 3) strided float32 view straight into the buffer; kept as is when all finite.
        xyz = np.ndarray((n, 3), '<f4', buffer=buf, offset=fx.offset, strides=(point_step, 4))
        keep = None if _buffer_all_finite(buf, xyz) else _finite_mask(xyz)
        if keep is not None or copy or not xyz.flags.aligned:
            xyz = _gather_rows(xyz, keep)
    else:
        xyz = np.empty((n, 3), np.float32)
        grid = xyz.reshape(height, width, 3)
        with np.errstate(over='ignore', invalid='ignore'):  # float64 beyond float32 -> inf -> dropped
            for c, f in enumerate((fx, fy, fz)):
                view = layout.view(f)
                if view.ndim == 2:
                    grid[:, :, c] = view
                else:
                    xyz[:, c] = view
        keep = _finite_mask(xyz)
        if keep is not None:
            xyz = _gather_rows(xyz, keep)
    if keep is None:
        indices = _arange(n)
    else:
        indices = np.flatnonzero(keep).astype(np.int64, copy=False)
        logger.debug('dropped %d of %d points with non-finite x/y/z', n - indices.size, n)

    def column(f: _Field | None, dtype: Any) -> np.ndarray | None:
        if f is None:
            return None
        values = layout.column(f, np.dtype(dtype), keep)
        if copy and not values.flags.owndata:
            values = values.copy()
        return values

    intensity, time, ring = column(f_int, np.float32), column(f_time, np.float64), column(f_ring, np.int64)
    if time is not None and DATATYPES[f_time.datatype][0] in 'iu':
        time = time * 1e-9  # integer stamps are nanoseconds
    extra = {f.name: column(f, DATATYPES[f.datatype]) for f in f_extra}
    return DecodedCloud(xyz=xyz, indices=indices, n_input=n, intensity=intensity, time=time, ring=ring,
                        frame_id=frame_id, stamp_ns=stamp_ns, height=height, width=width,
                        time_field=None if f_time is None else f_time.name, extra=extra)


# ------------------------------------------------------------------------------------ encode

def _field_dtype(name: str, values: np.ndarray) -> np.dtype:
    dtype = values.dtype
    if dtype == np.bool_:
        return np.dtype(np.uint8)
    if dtype == np.float16:
        return np.dtype(np.float32)
    native = dtype.newbyteorder('=') if dtype.byteorder not in ('=', '|') else dtype
    if native in _NUMPY_TO_DATATYPE:
        return native
    raise CloudError(f'field {name!r} has dtype {dtype}: expected one PointField can hold '
                     '(bool, int8/16/32, uint8/16/32, float16/32/64); cast it first')


_Plan = list[tuple[str, np.ndarray, np.dtype, int]]  # (name, values, stored dtype, offset) per extra field


def _plan(xyz: Any, fields: Mapping[str, Any]) -> tuple[np.ndarray, _Plan, int, bool]:
    """Validate inputs and lay fields out C-struct style (each aligned to its size)."""
    xyz = np.asarray(xyz)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise CloudError(f'xyz has shape {xyz.shape}: expected (N, 3)')
    if xyz.dtype.kind not in 'fiub':
        raise CloudError(f'xyz has dtype {xyz.dtype}: expected a real number type')
    n = xyz.shape[0]
    plan: _Plan = []
    offset, align = 12, 4
    for name, values in fields.items():
        if not isinstance(name, str) or not name:
            raise CloudError(f'field name {name!r}: expected a non-empty string')
        if name in ('x', 'y', 'z'):
            raise CloudError(f'field name {name!r} is reserved for xyz: expected another name')
        values = np.asarray(values)
        if values.shape != (n,):
            raise CloudError(f'field {name!r} has shape {values.shape}: expected ({n},), one value per point')
        dtype = _field_dtype(name, values)
        offset = -(-offset // dtype.itemsize) * dtype.itemsize
        plan.append((name, values, dtype, offset))
        offset += dtype.itemsize
        align = max(align, dtype.itemsize)
    point_step = -(-offset // align) * align
    if n * point_step >= 2 ** 32:
        raise CloudError(f'{n} points x point_step {point_step} = {n * point_step} bytes: expected < 2^32 '
                         '(row_step is a uint32)')
    packed = sum(d.itemsize for _, _, d, _ in plan) + 12 == point_step
    return xyz, plan, point_step, packed


def _fill(out: np.ndarray, xyz: np.ndarray, plan: _Plan, point_step: int) -> None:
    n = xyz.shape[0]
    if n == 0:
        return
    # Column by column: 1-D strided copies are the fastest numpy offers for interleaving.
    cols = np.ndarray((n, 3), '<f4', buffer=out, offset=0, strides=(point_step, 4))
    with np.errstate(over='ignore', invalid='ignore'):
        for c in range(3):
            cols[:, c] = xyz[:, c]
        for _, values, dtype, offset in plan:
            dst = np.ndarray((n,), dtype.newbyteorder('<'), buffer=out, offset=offset, strides=(point_step,))
            dst[...] = values


def _spec(plan: _Plan) -> list[tuple[str, int, int, int]]:
    spec = [('x', 0, 7, 1), ('y', 4, 7, 1), ('z', 8, 7, 1)]
    spec += [(name, offset, _NUMPY_TO_DATATYPE[dtype], 1) for name, _, dtype, offset in plan]
    return spec


def encode_buffer(xyz: Any, fields: Mapping[str, Any] | None = None
                  ) -> tuple[list[tuple[str, int, int, int]], np.ndarray, int]:
    """Pack points into a little-endian PointCloud2 byte layout.

    xyz (N, 3) is written as FLOAT32 x, y, z at offsets 0, 4, 8; each entry of ``fields``
    ((N,) array; bool is stored as UINT8, float16 as FLOAT32, other types as themselves) follows
    in dict order, aligned to its own size. Returns ``(fields_spec, data, point_step)`` with
    ``fields_spec`` a list of ``(name, offset, datatype, count)`` and ``data`` a uint8 array of
    ``N * point_step`` bytes (padding bytes are zero).
    """
    xyz, plan, point_step, packed = _plan(xyz, fields or {})
    size = xyz.shape[0] * point_step
    out = np.empty(size, np.uint8) if packed else np.zeros(size, np.uint8)
    _fill(out, xyz, plan, point_step)
    return _spec(plan), out, point_step


def _default_classes(msg_cls: type | None, field_cls: type | None, header_cls: type | None,
                     time_cls: type | None) -> tuple[type, type, type, type]:
    if msg_cls is not None:
        # rosbags typestores define all message classes of a store in one module.
        module = sys.modules.get(getattr(msg_cls, '__module__', ''), None)
        siblings = {'field': 'sensor_msgs__msg__PointField', 'header': 'std_msgs__msg__Header',
                    'time': 'builtin_interfaces__msg__Time'}
        if module is not None and hasattr(module, siblings['field']):
            field_cls = field_cls or getattr(module, siblings['field'])
            header_cls = header_cls or getattr(module, siblings['header'], None)
            time_cls = time_cls or getattr(module, siblings['time'], None)
    if msg_cls is None or field_cls is None or header_cls is None or time_cls is None:
        try:
            from builtin_interfaces.msg import Time
            from sensor_msgs.msg import PointCloud2, PointField
            from std_msgs.msg import Header
        except ImportError as exc:
            raise CloudError('encode: no message classes given and rclpy messages (sensor_msgs, std_msgs) '
                             f'cannot be imported ({exc}); pass msg_cls/field_cls/header_cls/time_cls'
                             ) from None
        msg_cls, field_cls = msg_cls or PointCloud2, field_cls or PointField
        header_cls, time_cls = header_cls or Header, time_cls or Time
    return msg_cls, field_cls, header_cls, time_cls


def _is_rclpy_class(cls: type) -> bool:
    # rosidl_generator_py classes carry SLOT_TYPES; their uint8[] setter only takes array.array fast.
    return hasattr(cls, 'SLOT_TYPES') and hasattr(cls, 'get_fields_and_field_types')


def encode(xyz: Any, fields: Mapping[str, Any] | None = None, *, header: Any = None, frame_id: str = '',
           stamp_ns: int = 0, msg_cls: type | None = None, field_cls: type | None = None,
           header_cls: type | None = None, time_cls: type | None = None, is_dense: bool | None = None) -> Any:
    """Build an unorganised (height 1) little-endian PointCloud2 message; layout as :func:`encode_buffer`.

    ``header`` (an existing Header object) is used as is; otherwise one is built from
    ``frame_id`` and ``stamp_ns``. Classes default to rclpy's; with a rosbags ``msg_cls`` the other
    classes are taken from the same typestore. ``is_dense`` defaults to "all xyz finite".
    """
    if header is not None and (frame_id or stamp_ns):
        raise CloudError('encode: pass either header or frame_id/stamp_ns, not both')
    msg_cls, field_cls, header_cls, time_cls = _default_classes(msg_cls, field_cls, header_cls, time_cls)
    xyz, plan, point_step, packed = _plan(xyz, fields or {})
    n = xyz.shape[0]
    size = n * point_step
    if _is_rclpy_class(msg_cls):
        # Fill the array.array in place: the message then owns the only copy of the bytes.
        data: Any = array.array('B', b'\0') * size
        out = np.frombuffer(data, np.uint8) if size else np.empty(0, np.uint8)
    else:
        data = out = np.empty(size, np.uint8) if packed else np.zeros(size, np.uint8)
    _fill(out, xyz, plan, point_step)
    if is_dense is None:
        is_dense = _finite_mask(xyz) is None
    if header is None:
        header = header_cls(stamp=ns_to_stamp(stamp_ns, time_cls), frame_id=str(frame_id))
    pf = [field_cls(name=name, offset=offset, datatype=datatype, count=count)
          for name, offset, datatype, count in _spec(plan)]
    common = dict(header=header, height=1, width=n, fields=pf, is_bigendian=False, point_step=point_step,
                  row_step=size, is_dense=bool(is_dense))
    if isinstance(data, array.array) and '_data' in getattr(msg_cls, '__slots__', ()):
        # rosidl's constructor and (with field checks off) its setter each copy the array again;
        # the slot takes our array.array('B') as is, which is exactly what the setter would store.
        msg = msg_cls(**common)
        msg._data = data
        return msg
    return msg_cls(data=data, **common)
