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
    v = verts.astype(float).tolist()
    c = rgb.astype(float).tolist()
    m.points = [Point(x=a, y=b, z=z) for a, b, z in v]
    m.colors = [ColorRGBA(r=r, g=g, b=b, a=float(alpha)) for r, g, b in c]
    return m
