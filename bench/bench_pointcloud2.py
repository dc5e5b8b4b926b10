#!/usr/bin/env python3
"""Latency of the PointCloud2 codec (zeroflow_ros.core.pointcloud2) per cloud.

What the node does per frame: decode a cloud of x, y, z, intensity (FLOAT32) and encode the
flow cloud x, y, z, flow_x, flow_y, flow_z, speed. Each figure is the median over --runs timed
calls after --warmup untimed ones, printed beside a plain ``bytes(buffer)`` copy of the input
message's buffer (the cheapest possible "touch every byte" baseline) as a ratio, then as JSON.

Extra rows time the general path (organised cloud with row padding, big-endian) for reference.

    python bench/bench_pointcloud2.py                # 100k points, rclpy messages if installed
    python bench/bench_pointcloud2.py --points 200000 --runs 100 --msg rosbags --json out.json
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from zeroflow_ros.core.pointcloud2 import decode, encode

KITTI = (Path(__file__).resolve().parents[1]
         / 'data/samples/kitti_raw_sfnd_seq/velodyne_points/data/0000000000.bin')


def points(n: int) -> np.ndarray:
    """(n, 4) x, y, z, intensity: the bundled real KITTI sweep (tiled if short), else random."""
    if KITTI.exists():
        pts = np.fromfile(KITTI, dtype='<f4').reshape(-1, 4)
        reps = -(-n // len(pts))
        return np.tile(pts, (reps, 1))[:n].copy()
    rng = np.random.default_rng(0)
    return np.concatenate([rng.uniform(-80, 80, (n, 3)), rng.random((n, 1))], 1).astype(np.float32)


def message_classes(kind: str) -> dict[str, Any]:
    if kind == 'rclpy':
        return {}
    if kind == 'rosbags':
        from rosbags.typesys import Stores, get_typestore
        return {'msg_cls': get_typestore(Stores.ROS2_KILTED).types['sensor_msgs/msg/PointCloud2']}
    raise SystemExit(f'--msg {kind}: expected rclpy or rosbags')


def timeit(fn: Callable[[], Any], runs: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    samples = np.empty(runs)
    gc_was = gc.isenabled()
    gc.disable()  # a collection inside one sample is noise, not codec cost
    try:
        for i in range(runs):
            t0 = time.perf_counter_ns()
            fn()
            samples[i] = time.perf_counter_ns() - t0
    finally:
        if gc_was:
            gc.enable()
    ms = samples * 1e-6
    return {'median_ms': float(np.median(ms)), 'p10_ms': float(np.percentile(ms, 10)),
            'p90_ms': float(np.percentile(ms, 90))}


class _Raw:
    """A PointCloud2 stand-in for layouts encode() does not write (organised, big-endian)."""

    def __init__(self, src: Any, **changes: Any) -> None:
        names = ('header', 'height', 'width', 'fields', 'is_bigendian', 'point_step', 'row_step', 'data',
                 'is_dense')
        self.__dict__.update({k: getattr(src, k) for k in names})
        self.__dict__.update(changes)


def general_layouts(pts: np.ndarray, src: Any) -> dict[str, Any]:
    n = len(pts)
    out = {}
    # Organised like an Ouster driver: 128 rows, 16-byte points, 4 bytes of padding per row.
    width = n // 128
    m = width * 128
    rec = np.zeros((128, width * 16 + 4), np.uint8)
    rec[:, :width * 16] = pts[:m].reshape(128, width * 4).view(np.uint8)
    out['organised_row_padding'] = _Raw(src, height=128, width=width, row_step=width * 16 + 4,
                                        data=rec.reshape(-1))
    out['bigendian'] = _Raw(src, is_bigendian=True, data=pts.astype('>f4').reshape(-1).view(np.uint8))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--points', type=int, default=100_000)
    ap.add_argument('--runs', type=int, default=200, help='timed runs per figure (>= 50)')
    ap.add_argument('--warmup', type=int, default=20)
    ap.add_argument('--msg', default='rclpy', help='message classes: rclpy (default) or rosbags')
    ap.add_argument('--json', type=Path, help='also write the JSON here')
    args = ap.parse_args(argv)
    if args.runs < 50:
        ap.error('--runs must be >= 50 for a meaningful median')

    classes = message_classes(args.msg)
    pts = points(args.points)
    msg_in = encode(pts[:, :3], {'intensity': pts[:, 3]}, frame_id='lidar', stamp_ns=1, **classes)
    rng = np.random.default_rng(1)
    flow = rng.standard_normal((args.points, 3)).astype(np.float32)
    out_fields = {'flow_x': flow[:, 0], 'flow_y': flow[:, 1], 'flow_z': flow[:, 2],
                  'speed': np.linalg.norm(flow, axis=1).astype(np.float32)}
    decoded = decode(msg_in)

    kw = dict(header=msg_in.header, **classes)
    reps = (args.runs, args.warmup)

    def round_trip() -> Any:
        # Decoded xyz are finite by construction, so the caller knows is_dense (as the node does).
        d = decode(msg_in)
        return encode(d.xyz, out_fields, header=msg_in.header, is_dense=True, **classes)

    rows = {
        'bytes_copy': timeit(lambda: bytes(msg_in.data), args.runs, args.warmup),
        'decode': timeit(lambda: decode(msg_in), args.runs, args.warmup),
        'encode': timeit(lambda: encode(decoded.xyz, out_fields, is_dense=True, **kw), *reps),
        'encode_is_dense_computed': timeit(lambda: encode(decoded.xyz, out_fields, **kw), *reps),
        'decode+encode': timeit(round_trip, args.runs, args.warmup),
    }
    for name, msg in general_layouts(pts, msg_in).items():
        rows[f'decode_{name}'] = timeit(lambda m=msg: decode(m), args.runs, args.warmup)

    base = rows['bytes_copy']['median_ms']
    out_step = encode(decoded.xyz[:1], {k: v[:1] for k, v in out_fields.items()}, **classes).point_step
    print(f'{args.points} points, {args.msg} messages, in point_step {msg_in.point_step}, out point_step '
          f'{out_step}, median of {args.runs} runs after {args.warmup} warm-up; {platform.machine()}, '
          f'{os.cpu_count()} CPUs')
    print(f'{"":28s} {"median ms":>10s} {"p10":>8s} {"p90":>8s} {"x bytes()":>10s}')
    for name, r in rows.items():
        print(f'{name:28s} {r["median_ms"]:10.3f} {r["p10_ms"]:8.3f} {r["p90_ms"]:8.3f} '
              f'{r["median_ms"] / base:10.1f}')
    target = rows['decode+encode']['median_ms'] * 100_000 / args.points
    print(f'decode+encode per 100k points: {target:.3f} ms (target <= 1 ms)')
    result = {'points': args.points, 'msg': args.msg, 'runs': args.runs, 'warmup': args.warmup,
              'machine': platform.machine(), 'python': platform.python_version(), 'numpy': np.__version__,
              'results': {k: dict(v, ratio_to_bytes_copy=v['median_ms'] / base) for k, v in rows.items()},
              'decode_encode_ms_per_100k': target}
    text = json.dumps(result, indent=None)
    print(text)
    if args.json:
        args.json.write_text(text + '\n')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
