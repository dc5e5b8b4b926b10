"""End-to-end latency of zeroflow_node over real DDS: message received -> flow published.

For each point count (real KITTI sweeps from data/samples, subsampled or repeated with jitter to
the count) the node runs in-process with a publisher node on the same machine:

1. steady: clouds at --rate Hz (10) -> latency p50/p99 (node-side, receive -> publish), stage
   timings from ~/debug/*_ms, output rate, stale drops;
2. overload: clouds at 2x the measured processing rate -> latency must stay bounded (latest wins:
   at most one frame waits) and the dropped frames are counted.

    python bench/bench_node.py --points 60000,100000 --json out.json
    python bench/bench_node.py --model models/default --backend onnxruntime --ego-motion lidar

Without --model a randomly initialised model of --config (cpu_small) is used: latency does not
depend on the weights.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
KITTI = ROOT / 'data' / 'samples' / 'kitti_raw_sfnd_seq' / 'velodyne_points' / 'data'


def sweeps(n_points: int, seed: int = 0) -> list[np.ndarray]:
    """The 10 KITTI sweeps at exactly ``n_points`` points each (subsample or repeat with 1 cm jitter)."""
    rng = np.random.default_rng(seed)
    out = []
    for path in sorted(KITTI.glob('*.bin')):
        pts = np.fromfile(path, np.float32).reshape(-1, 4)[:, :3]
        if len(pts) >= n_points:
            idx = np.sort(rng.choice(len(pts), n_points, replace=False))
            out.append(np.ascontiguousarray(pts[idx]))
        else:
            extra = pts[rng.integers(0, len(pts), n_points - len(pts))]
            extra = extra + rng.normal(0, 0.01, extra.shape).astype(np.float32)
            out.append(np.concatenate([pts, extra]).astype(np.float32))
    return out


def random_model(config: str, folder: Path, onnx: bool) -> Path:
    """Random-init checkpoint of ``config`` (+ ONNX and manifest when ``onnx``); returns the folder/file."""
    from zeroflow_training.export import export_onnx, make_random_checkpoint
    ckpt = make_random_checkpoint(config, folder / 'model.pt')
    if not onnx:
        return ckpt
    export_onnx(ckpt, folder / 'model.onnx', verify=False)
    return folder


def pct(values, q):
    return round(float(np.percentile(values, q)), 1) if len(values) else float('nan')


def run_phase(node, pub, clouds, rate_hz: float, count: int, stamp0: int, debug: dict) -> dict:
    """Publish ``count`` clouds at ``rate_hz``; return node-side latency and counters for them."""
    from zeroflow_ros.core import pointcloud2 as pc2
    msgs = [pc2.encode(c, {}, frame_id='velodyne', stamp_ns=0) for c in clouds]
    s = node.stats
    base = dict(received=s.received, published=s.published, dropped=s.dropped_stale,
                lat=len(s.latencies_ms), errors=s.errors_total)
    s.latencies_ms = type(s.latencies_ms)(maxlen=10_000)
    for k in debug:
        debug[k].clear()
    period = 1.0 / rate_hz
    t_next = time.monotonic()
    t_start = t_next
    for i in range(count):
        k = i % (2 * len(msgs) - 2)  # ping-pong through the sequence: no jump for lidar odometry
        msg = msgs[k if k < len(msgs) else 2 * len(msgs) - 2 - k]
        stamp = stamp0 + i * int(period * 1e9)
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp, 1_000_000_000)
        time.sleep(max(0.0, t_next - time.monotonic()))
        pub.publish(msg)
        t_next += period
    node.wait_idle(30)
    wall = time.monotonic() - t_start
    lat = list(s.latencies_ms)
    return {
        'input_hz': round(rate_hz, 2),
        'sent': count,
        'received': s.received - base['received'],
        'published': s.published - base['published'],
        'dropped_stale': s.dropped_stale - base['dropped'],
        'errors': s.errors_total - base['errors'],
        'output_hz': round((s.published - base['published']) / wall, 2),
        'latency_ms_p50': pct(lat, 50), 'latency_ms_p99': pct(lat, 99),
        'latency_ms_max': round(max(lat), 1) if lat else float('nan'),
        'stages_ms_p50': {k: pct(v, 50) for k, v in debug.items()},
    }


def pipeline_only(a: argparse.Namespace, model: str) -> dict:
    """Per-frame cost of Pipeline.step alone (no DDS, no codec): runs where rclpy is missing (GPU boxes)."""
    from zeroflow_ros.backends import create_backend
    from zeroflow_ros.pipeline import Pipeline, PipelineConfig

    backend = create_backend(model, backend=a.backend, device=a.device, precision=a.precision)
    b = backend.describe()
    out = {'mode': 'pipeline-only', 'backend': f"{b.get('backend')}/{b.get('device')}/{b.get('precision')}",
           'grid': b.get('grid', {}).get('shape'), 'ego_motion': a.ego_motion, 'runs': []}
    for n in [int(x) for x in a.points.split(',')]:
        clouds = sweeps(n)
        pipe = Pipeline(PipelineConfig(ego_motion=a.ego_motion, max_sweep_gap_s=10.0), backend=backend)
        times: dict[str, list] = {k: [] for k in ('preprocess', 'inference', 'postprocess', 'total')}
        for i in range(5 + a.count):
            k = i % (2 * len(clouds) - 2)
            cloud = clouds[k if k < len(clouds) else 2 * len(clouds) - 2 - k]
            frame = pipe.step(cloud, (i + 1) * 100_000_000)
            if frame is not None and i >= 5:
                for key in times:
                    times[key].append(frame.timings_ms[key])
        run = {'points': n, **{f'{k}_ms_p50': pct(v, 50) for k, v in times.items()},
               'total_ms_p99': pct(times['total'], 99)}
        out['runs'].append(run)
        print(f"{n:>7} pts: total p50 {run['total_ms_p50']} ms p99 {run['total_ms_p99']} ms "
              f"(pre {run['preprocess_ms_p50']}, inference {run['inference_ms_p50']}, "
              f"post {run['postprocess_ms_p50']})")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--points', default='60000,100000')
    ap.add_argument('--model', default=None, help='model path (default: random-init --config)')
    ap.add_argument('--config', default='cpu_small', help='model config for the random-init model')
    ap.add_argument('--no-onnx', action='store_true', help='random-init model as a checkpoint only (torch)')
    ap.add_argument('--backend', default='auto')
    ap.add_argument('--ego-motion', default='none', choices=('none', 'lidar'))
    ap.add_argument('--rate', type=float, default=10.0)
    ap.add_argument('--count', type=int, default=40, help='clouds per steady phase')
    ap.add_argument('--overload-count', type=int, default=30)
    ap.add_argument('--device', default='auto', help='--pipeline-only: backend device')
    ap.add_argument('--precision', default='fp32', help='--pipeline-only: backend precision')
    ap.add_argument('--pipeline-only', action='store_true',
                    help='time Pipeline.step without ROS (e.g. on a GPU machine without rclpy)')
    ap.add_argument('--json', default=None)
    a = ap.parse_args(argv)
    if a.pipeline_only:
        with tempfile.TemporaryDirectory() as tmp:
            model = a.model or str(random_model(a.config, Path(tmp), onnx=not a.no_onnx))
            res = pipeline_only(a, model)
        res['model'] = a.model or f'random-init {a.config}'
        res['machine'] = {'cpu_count': os.cpu_count(), 'load_avg_1min': os.getloadavg()[0]}
        print(json.dumps(res, indent=1))
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=1))
        return 0

    os.environ.pop('_ROS_WHEELS_BOOTSTRAP_COMPLETE', None)
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import PointCloud2
    from std_msgs.msg import Float64

    from zeroflow_ros.node import ZeroFlowNode
    from zeroflow_ros.testing import ros_context, wait_for_matched

    tmp = tempfile.TemporaryDirectory()
    model = a.model or str(random_model(a.config, Path(tmp.name), onnx=not a.no_onnx))
    results = {'machine': {'cpu_count': os.cpu_count(), 'load_avg_1min': os.getloadavg()[0],
                           'processor': platform.processor() or platform.machine(),
                           'python': sys.version.split()[0]},
               'model': a.model or f'random-init {a.config}', 'backend': a.backend,
               'ego_motion': a.ego_motion, 'runs': []}
    with ros_context() as ctx:
        params = [Parameter('model', value=model), Parameter('backend', value=a.backend),
                  Parameter('ego_motion', value=a.ego_motion),
                  Parameter('latency_budget_ms', value=10000.0),
                  Parameter('max_sweep_gap_s', value=10.0), Parameter('publish_markers', value=False)]
        node = ZeroFlowNode('zf_bench', context=ctx, parameter_overrides=params)
        probe = rclpy.create_node('zf_bench_probe', context=ctx)
        debug: dict[str, list] = {k: [] for k in ('preprocess', 'inference', 'postprocess', 'total')}
        be = QoSProfile(depth=10, reliability=ReliabilityPolicy.BEST_EFFORT)
        for k in debug:
            probe.create_subscription(Float64, f'/zf_bench/debug/{k}_ms',
                                      lambda m, k=k: debug[k].append(m.data), be)
        probe.create_subscription(PointCloud2, '/zf_bench/output/flow', lambda m: None, 1)
        pub = probe.create_publisher(PointCloud2, '/zf_bench/input/pointcloud',
                                     QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT))
        ex = SingleThreadedExecutor(context=ctx)
        ex.add_node(node)
        ex.add_node(probe)
        spin = threading.Thread(target=ex.spin, daemon=True)
        spin.start()
        wait_for_matched(pub)
        time.sleep(1.0)  # node's own view of the flow subscriber (skip_when_no_subscribers)
        b = node.pipeline.describe()['backend']
        results['backend'] = f"{b.get('backend')}/{b.get('device')}/{b.get('precision')}"
        results['grid'] = b.get('grid', {}).get('shape')
        stamp = 1_000_000_000_000
        try:
            for n in [int(x) for x in a.points.split(',')]:
                clouds = sweeps(n)
                run_phase(node, pub, clouds, a.rate, 5, stamp, debug)  # warm-up
                stamp += 10 * 10**9
                steady = run_phase(node, pub, clouds, a.rate, a.count, stamp, debug)
                stamp += 100 * 10**9
                proc_ms = steady['stages_ms_p50'].get('total') or 100.0
                over_rate = 2.0 * 1000.0 / max(proc_ms, 1.0)
                overload = run_phase(node, pub, clouds, over_rate, a.overload_count, stamp, debug)
                stamp += 100 * 10**9
                run = {'points': n, 'steady': steady, 'overload_2x': overload}
                results['runs'].append(run)
                for name, r in (('steady', steady), ('overload', overload)):
                    print(f'{n:>7} pts {name:>8} @{r["input_hz"]:5.1f} Hz: '
                          f'latency p50 {r["latency_ms_p50"]} ms '
                          f'p99 {r["latency_ms_p99"]} max {r["latency_ms_max"]} ms, out {r["output_hz"]} Hz, '
                          f'dropped {r["dropped_stale"]}/{r["received"]}, stages p50 {r["stages_ms_p50"]}')
        finally:
            ex.shutdown()
            spin.join(5)
            node.destroy_node()
            probe.destroy_node()
    print(json.dumps(results, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    tmp.cleanup()
    return 0


if __name__ == '__main__':
    sys.exit(main())
