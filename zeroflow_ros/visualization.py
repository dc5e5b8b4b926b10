"""Flow arrows for rviz: one LINE_LIST marker of the dynamic points, coloured by speed.

The geometry (which points, segment ends, colours) is numpy and ROS-free; only
:func:`flow_marker` builds a ``visualization_msgs/Marker`` (imported lazily).
"""
from __future__ import annotations

from typing import Any

import numpy as np

# Piecewise-linear "speed" palette, slow -> fast: blue, cyan, green, yellow, red.
_PALETTE = np.array([
    [0.00, 0.0, 0.2, 1.0],
    [0.25, 0.0, 0.9, 1.0],
    [0.50, 0.1, 0.9, 0.1],
    [0.75, 1.0, 0.9, 0.0],
    [1.00, 1.0, 0.1, 0.0],
], dtype=np.float64)


def speed_colors(speed: np.ndarray, max_speed: float) -> np.ndarray:
    """(N,3) float32 RGB in [0, 1] for speeds in m/s; ``max_speed`` and above are red."""
    if max_speed <= 0:
        raise ValueError(f'max_speed: expected > 0, got {max_speed}')
    s = np.clip(np.asarray(speed, np.float64) / max_speed, 0.0, 1.0)
    rgb = np.stack([np.interp(s, _PALETTE[:, 0], _PALETTE[:, c]) for c in (1, 2, 3)], axis=1)
    return rgb.astype(np.float32)


def arrow_segments(points: np.ndarray, flow: np.ndarray, speed: np.ndarray, is_dynamic: np.ndarray, *,
                   decimation: int = 1, length_scale: float = 1.0, max_arrows: int = 5000,
                   max_speed: float = 15.0) -> tuple[np.ndarray, np.ndarray]:
    """Line-list vertices (2K,3) and per-vertex colours (2K,3) for the dynamic points.

    Every ``decimation``-th dynamic point is kept (then at most ``max_arrows``, evenly), each
    drawn from ``p`` to ``p + length_scale * flow``.
    """
    if decimation < 1:
        raise ValueError(f'decimation: expected >= 1, got {decimation}')
    idx = np.flatnonzero(is_dynamic)[::decimation]
    if len(idx) > max_arrows:
        idx = idx[np.floor(np.arange(max_arrows) * (len(idx) / max_arrows)).astype(np.int64)]
    p = np.asarray(points, np.float32)[idx]
    q = p + np.float32(length_scale) * np.asarray(flow, np.float32)[idx]
    verts = np.empty((2 * len(idx), 3), np.float32)
    verts[0::2], verts[1::2] = p, q
    rgb = np.repeat(speed_colors(np.asarray(speed)[idx], max_speed), 2, axis=0)
    return verts, rgb


def flow_marker(header: Any, verts: np.ndarray, rgb: np.ndarray, *, line_width: float = 0.05,
                ns: str = 'zeroflow_flow', alpha: float = 1.0) -> Any:
    """Build a ``visualization_msgs/Marker`` LINE_LIST (replaces the previous one: fixed ns/id)."""
    from builtin_interfaces.msg import Duration
    from geometry_msgs.msg import Point
    from std_msgs.msg import ColorRGBA
    from visualization_msgs.msg import Marker

    m = Marker()
    m.header = header
    m.ns = ns
    m.id = 0
    m.type = Marker.LINE_LIST
    m.action = Marker.ADD
    m.pose.orientation.w = 1.0
    m.scale.x = float(line_width)
    m.color.a = float(alpha)
    m.lifetime = Duration(sec=1, nanosec=0)  # arrows vanish if the node stops publishing
    # The generated constructors and setters type-check every field: ~15 us per Point, 150 ms
    # for 5000 arrows. The values are plain floats by construction, so fill the slots directly.
    _set_unchecked(m, 'points', _points(Point, np.asarray(verts, np.float64).tolist()))
    _set_unchecked(m, 'colors', _colors(ColorRGBA, np.asarray(rgb, np.float64).tolist(), float(alpha)))
    return m


def _points(cls: Any, xyz: list) -> list:
    if '_x' not in getattr(cls, '__slots__', ()):
        return [cls(x=x, y=y, z=z) for x, y, z in xyz]
    new, out = cls.__new__, []
    for x, y, z in xyz:
        p = new(cls)
        p._check_fields = False
        p._x = x
        p._y = y
        p._z = z
        out.append(p)
    return out


def _colors(cls: Any, rgb: list, alpha: float) -> list:
    if '_r' not in getattr(cls, '__slots__', ()):
        return [cls(r=r, g=g, b=b, a=alpha) for r, g, b in rgb]
    new, out = cls.__new__, []
    for r, g, b in rgb:
        c = new(cls)
        c._check_fields = False
        c._r = r
        c._g = g
        c._b = b
        c._a = alpha
        out.append(c)
    return out


def _set_unchecked(msg: Any, name: str, value: list) -> None:
    if '_' + name in getattr(type(msg), '__slots__', ()):
        setattr(msg, '_' + name, value)
    else:  # another message implementation: the checked setter
        setattr(msg, name, value)
