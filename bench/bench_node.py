"""End-to-end latency of zeroflow_node over real DDS: message received -> flow published.

For each point count (real KITTI sweeps from data/samples, subsampled or repeated with jitter to
the count) the node runs in-process with a publisher node on the same machine:

1. steady: clouds at --rate Hz (10) -> latency p50/p99 (node-side, receive -> publish), the
   node's per-stage wall times (decode ... publish), output rate, stale drops;
2. overload: clouds at --overload-rate Hz (20) -> latency must stay bounded (latest wins: at most
   one message and one pair wait) and the dropped sweeps are counted.

    python bench/bench_node.py --rate 10 --points 100000          # shipped model, default parameters
    python bench/bench_node.py --soak 30 --points 100000           # flows/s, p50/p99, RSS per minute
    python bench/bench_node.py --model random --config cpu_small  # untrained model of a config

The node runs with its default parameters (lidar odometry on, models/default) unless told
otherwise; the publisher lives in the same process (its CPU counts against the node's 2 cores
too, as a lidar driver would).
"""
from __future__ import annotations

import argparse
import collections
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
    """Return the 10 KITTI sweeps at ``n_points`` points each (subsampled, or repeated with 1 cm jitter)."""
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


#: the node's stages: decode .. sweep_encoder on the sweep worker, pair_points .. publish on the pair
#: worker (markers, when someone subscribes to them, on a third, best-effort worker)
STAGES = ('decode', 'check', 'ground', 'odometry', 'sweep_pillars', 'sweep_encoder', 'pair_points', 'network',
          'scatter', 'encode', 'publish')


class Publisher:
    """Clouds at a fixed rate, played back and forth (no jump for the lidar odometry), stamps at the rate."""

    def __init__(self, pub, clouds, stamp0: int):
        from zeroflow_ros.core import pointcloud2 as pc2
        self.pub = pub
        self.msgs = [pc2.encode(c, {}, frame_id='velodyne', stamp_ns=0) for c in clouds]
        self.stamp = stamp0
        self.i = 0

    def run(self, rate_hz: float, count: int | None = None, until: float | None = None) -> int:
        period = 1.0 / rate_hz
        t_next = time.monotonic()
        sent = 0
        while (count is None or sent < count) and (until is None or t_next < until):
            n = len(self.msgs)
            k = self.i % (2 * n - 2)
            msg = self.msgs[k if k < n else 2 * n - 2 - k]
            self.stamp += int(period * 1e9)
            msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(self.stamp, 1_000_000_000)
            time.sleep(max(0.0, t_next - time.monotonic()))
            self.pub.publish(msg)
            self.i += 1
            sent += 1
            t_next += period
        return sent


class Window:
    """Node counters and latencies since the window opened."""

    def __init__(self, node):
        s = self.s = node.stats
        # large enough for a 30-minute soak at 20 Hz; the node keeps 200 by default
        if s.latencies_ms.maxlen < 100_000:
            s.latencies_ms = collections.deque(s.latencies_ms, maxlen=100_000)
            s.stages_ms = collections.deque(s.stages_ms, maxlen=100_000)
            s.marker_ms = collections.deque(s.marker_ms, maxlen=100_000)
        self.base = dict(received=s.received, published=s.published, dropped=s.dropped_stale,
                         pairs=s.dropped_pairs, errors=s.errors_total, lat=len(s.latencies_ms),
                         stages=len(s.stages_ms), markers=len(s.marker_ms))
        self.t0 = time.monotonic()
        self.cpu0 = time.process_time()

    def result(self, rate_hz: float, sent: int) -> dict:
        s, b = self.s, self.base
        wall = time.monotonic() - self.t0
        cpu_ms = (time.process_time() - self.cpu0) * 1e3
        flows = s.published - b['published']
        lat = list(s.latencies_ms)[b['lat']:]
        stages = list(s.stages_ms)[b['stages']:]
        return {
            'input_hz': round(rate_hz, 2), 'sent': sent,
            'received': s.received - b['received'], 'published': s.published - b['published'],
            'dropped_stale': s.dropped_stale - b['dropped'], 'dropped_pairs': s.dropped_pairs - b['pairs'],
            'errors': s.errors_total - b['errors'],
            'flows_per_s': round(flows / wall, 2),
            # CPU of this process (node + publisher, all threads): what load from other jobs does
            # not inflate much. cpu_ms_per_s 2000 = both cores of a 2-core machine busy.
            'cpu_ms_per_s': round(cpu_ms / wall, 1),
            'cpu_ms_per_flow': round(cpu_ms / flows, 1) if flows else float('nan'),
            'latency_ms_p50': pct(lat, 50), 'latency_ms_p99': pct(lat, 99),
            'latency_ms_max': round(max(lat), 1) if lat else float('nan'),
            'stages_ms_p50': {**{k: pct([st.get(k, 0.0) for st in stages], 50) for k in STAGES},
                              'markers': pct(list(s.marker_ms)[b['markers']:], 50)},
            'rss_mb': rss_mb(), 'load_avg_1min': round(os.getloadavg()[0], 2),
        }


def rss_mb() -> float:
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith('VmRSS:'):
            return round(int(line.split()[1]) / 1024.0, 1)
    return float('nan')


def run_phase(node, publisher: Publisher, rate_hz: float, count: int) -> dict:
    """Publish ``count`` clouds at ``rate_hz``; return node-side latency, counters and stages for them."""
    win = Window(node)
    sent = publisher.run(rate_hz, count=count)
    node.wait_idle(30)
    return win.result(rate_hz, sent)


def soak(node, publisher: Publisher, rate_hz: float, minutes: float) -> list[dict]:
    """Publish at ``rate_hz`` for ``minutes``; one row per minute (flows/s, p50/p99, RSS, drops)."""
    rows = []
    end = time.monotonic() + 60.0 * minutes
    while time.monotonic() < end - 1.0:
        win = Window(node)
        sent = publisher.run(rate_hz, until=min(end, time.monotonic() + 60.0))
        row = win.result(rate_hz, sent)
        row['minute'] = len(rows) + 1
        rows.append(row)
        print(f"soak min {row['minute']:>3}: {row['flows_per_s']} flows/s, "
              f"latency p50 {row['latency_ms_p50']} p99 {row['latency_ms_p99']} ms, "
              f"dropped {row['dropped_stale']}/{row['received']}, "
              f"RSS {row['rss_mb']} MB, CPU {row['cpu_ms_per_s']} ms/s, load {row['load_avg_1min']}",
              flush=True)
    node.wait_idle(30)
    return rows


def drift(rows: list[dict], key: str) -> float:
    """Relative change (%) of ``key`` from the first to the last third of a soak."""
    vals = [r[key] for r in rows if np.isfinite(r[key])]
    if len(vals) < 2:
        return float('nan')
    k = max(1, len(vals) // 3)
    a, b = float(np.mean(vals[:k])), float(np.mean(vals[-k:]))
    return round((b - a) / a * 100.0, 1) if a else float('nan')


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
        pipe = Pipeline(PipelineConfig(ego_motion=a.ego_motion, max_sweep_gap_s=10.0,
                                       sensor_in_base_xyz=(0.0, 0.0, a.sensor_height)), backend=backend)
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


def stage_line(stages: dict) -> str:
    return ', '.join(f'{k} {v}' for k, v in stages.items())


def node_params(a: argparse.Namespace, model: str) -> list:
    """Only what the command line sets: everything else stays at the node's defaults."""
    from rclpy.parameter import Parameter
    import yaml
    # the clouds are KITTI's (HDL-64 1.73 m above the road): the node is told so, as a user would
    # (and as `zeroflow demo` does); in the sensor frame the model sees a world it was not trained in
    params = [Parameter('model', value=model),
              Parameter('sensor_in_base_xyz', value=[0.0, 0.0, float(a.sensor_height)])]
    for name, value in (('backend', a.backend), ('precision', a.precision), ('ego_motion', a.ego_motion),
                        ('inference_threads', a.threads)):
        if value is not None:
            params.append(Parameter(name, value=value))
    for item in a.param:
        name, _, value = item.partition(':=')
        params.append(Parameter(name, value=yaml.safe_load(value)))
    return params


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--points', default='100000')
    ap.add_argument('--model', default=str(ROOT / 'models' / 'default'),
                    help="model path (default: the shipped models/default); 'random' = untrained --config")
    ap.add_argument('--config', default='cpu_small', help='model config for --model random')
    ap.add_argument('--no-onnx', action='store_true', help='random-init model as a checkpoint only (torch)')
    ap.add_argument('--backend', default=None, help='node parameter backend (default: the node default)')
    ap.add_argument('--precision', default=None, help='node parameter precision (default: the node default)')
    ap.add_argument('--ego-motion', default=None, choices=('none', 'lidar'),
                    help='node parameter ego_motion (default: the node default, lidar)')
    ap.add_argument('--threads', type=int, default=None,
                    help='node parameter inference_threads (default: the node default, half the cores)')
    ap.add_argument('--rate', type=float, default=10.0)
    ap.add_argument('--count', type=int, default=100, help='clouds per steady phase')
    ap.add_argument('--overload-rate', type=float, default=20.0)
    ap.add_argument('--overload-count', type=int, default=60)
    ap.add_argument('--soak', type=float, default=None, metavar='MINUTES',
                    help='publish at --rate for MINUTES: flows/s, latency p50/p99 and RSS per minute')
    ap.add_argument('--sensor-height', type=float, default=1.73,
                    help='sensor_in_base_xyz z of the node (default 1.73 m: the KITTI sweeps\' HDL-64)')
    ap.add_argument('--param', action='append', default=[], metavar='NAME:=VALUE',
                    help='any other node parameter, e.g. --param motion_evidence:=false')
    ap.add_argument('--device', default='auto', help='--pipeline-only: backend device')
    ap.add_argument('--pipeline-only', action='store_true',
                    help='time Pipeline.step without ROS (e.g. on a GPU machine without rclpy)')
    ap.add_argument('--json', default=None)
    a = ap.parse_args(argv)
    tmp = tempfile.TemporaryDirectory()
    model = a.model if a.model != 'random' else \
        str(random_model(a.config, Path(tmp.name), onnx=not a.no_onnx))
    if a.pipeline_only:
        a.backend, a.precision = a.backend or 'auto', a.precision or 'fp32'
        a.ego_motion = a.ego_motion or 'lidar'
        res = pipeline_only(a, model)
        res['model'] = a.model
        res['machine'] = {'cpu_count': os.cpu_count(), 'load_avg_1min': os.getloadavg()[0]}
        print(json.dumps(res, indent=1))
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=1))
        return 0
    try:
        results = run_node_bench(a, model)
    finally:
        tmp.cleanup()
    print(json.dumps(results, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


def run_node_bench(a: argparse.Namespace, model: str) -> dict:
    os.environ.pop('_ROS_WHEELS_BOOTSTRAP_COMPLETE', None)
    import rclpy
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import PointCloud2

    from zeroflow_ros.node import ZeroFlowNode
    from zeroflow_ros.testing import ros_context, wait_for_matched

    results = {'machine': {'cpu_count': os.cpu_count(), 'load_avg_1min': os.getloadavg()[0],
                           'processor': platform.processor() or platform.machine(),
                           'python': sys.version.split()[0]},
               'model': a.model, 'runs': []}
    with ros_context() as ctx:
        node = ZeroFlowNode('zf_bench', context=ctx, parameter_overrides=node_params(a, model))
        probe = rclpy.create_node('zf_bench_probe', context=ctx)
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
        results['onnx'] = b.get('onnx')
        results['ego_motion'] = node.config.ego_motion
        results['grid'] = b.get('grid', {}).get('shape')
        try:
            for n in [int(x) for x in a.points.split(',')]:
                publisher = Publisher(pub, sweeps(n), 1_000_000_000_000)
                run_phase(node, publisher, a.rate, 10)  # warm-up (odometry map, caches)
                if a.soak:
                    rows = soak(node, publisher, a.rate, a.soak)
                    results['runs'].append({'points': n, 'soak': rows,
                                            'drift_percent': {k: drift(rows, k) for k in
                                                              ('flows_per_s', 'latency_ms_p50',
                                                               'latency_ms_p99', 'rss_mb')}})
                    print(f"soak drift first->last third (%): {results['runs'][-1]['drift_percent']}")
                    continue
                steady = run_phase(node, publisher, a.rate, a.count)
                overload = run_phase(node, publisher, a.overload_rate, a.overload_count)
                results['runs'].append({'points': n, 'steady': steady, 'overload': overload})
                for name, r in (('steady', steady), ('overload', overload)):
                    print(f'{n:>7} pts {name:>8} @{r["input_hz"]:5.1f} Hz: {r["flows_per_s"]} flows/s, '
                          f'latency p50 {r["latency_ms_p50"]} p99 {r["latency_ms_p99"]} '
                          f'max {r["latency_ms_max"]} ms, dropped {r["dropped_stale"]}/{r["received"]} '
                          f'(pairs {r["dropped_pairs"]}), errors {r["errors"]}, '
                          f'CPU {r["cpu_ms_per_flow"]} ms per flow ({r["cpu_ms_per_s"]} ms/s), '
                          f'load {r["load_avg_1min"]}')
                    print(f'{"":>12} stages p50 ms: {stage_line(r["stages_ms_p50"])}')
        finally:
            ex.shutdown()
            spin.join(5)
            node.destroy_node()
            probe.destroy_node()
    return results


if __name__ == '__main__':
    sys.exit(main())
