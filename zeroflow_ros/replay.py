"""``zeroflow replay``: a rosbag2 through the scene-flow node over real DDS, outputs recorded.

::

    zeroflow replay BAG --topic /lidar [--odom /odom] [--rate 1.0] [--record OUT.mcap]
                        [--no-node] [--params-file F] [--node-name N] [--node-param K:=V ...] [--timeout S]

What happens:

1. The bag (mcap or sqlite3, a truncated mcap up to its break) is checked: the cloud topic must
   be ``sensor_msgs/msg/PointCloud2`` (the odometry one ``nav_msgs/msg/Odometry``); otherwise a
   :class:`ReplayError` lists the bag's topics and types.
2. Unless ``--no-node``, ``zeroflow node`` is started in its own process with
   ``use_sim_time:=true``, ``__node:=N`` and ``~/input/pointcloud`` remapped to the topic (with
   ``--odom``: ``ego_motion:=odometry`` and ``~/input/odometry`` remapped). It is stopped with
   SIGINT at the end (SIGTERM/SIGKILL only if it does not exit).
3. The replayer subscribes to ``/N/output/flow``, ``/N/output/flow_markers``, ``/diagnostics``
   and ``/N/debug/*_ms``, waits until the node's endpoints are matched (no blind sleeps), then
   publishes ``/clock`` (the bag's time), the odometry and the clouds as they are stored (raw CDR,
   no re-encoding).
4. Pacing: ``--rate R > 0`` keeps the recorded intervals divided by R; a node slower than that
   drops clouds (latest wins), which the summary counts. ``--rate 0`` is lossless: the next cloud
   goes out only when the flow that proves the node finished the previous cloud has arrived (or
   after ``--frame-timeout``, counted). The second cloud of a pair has no such proof (the node
   publishes nothing for the first sweep), so it keeps its recorded interval.
5. With ``--record OUT.mcap`` the node's outputs are written to a new mcap bag (rosbags Writer,
   newest rosbag2 version) with log time = the replay clock; it reads back in rosbags, Foxglove
   and ``ros2 bag``.

Latency here is end to end over DDS: wall time from publishing sweep t+1 to receiving the flow of
sweep t (the node can only compute flow for t once t+1 is there).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

log = logging.getLogger(__name__)

POINTCLOUD2 = 'sensor_msgs/msg/PointCloud2'
ODOMETRY = 'nav_msgs/msg/Odometry'
MARKER = 'visualization_msgs/msg/Marker'
DIAGNOSTICS = 'diagnostic_msgs/msg/DiagnosticArray'
FLOAT64 = 'std_msgs/msg/Float64'
DEBUG_TOPICS = ('preprocess', 'inference', 'postprocess', 'total', 'pipeline_latency')
DEFAULT_NODE_NAME = 'zeroflow_node'


class ReplayError(ValueError):
    """The bag, the topics or the node cannot be replayed as asked (names what and why)."""


# ---------------------------------------------------------------------------------------- bag

@dataclass
class BagMessage:
    """One message to publish: bag log time, header stamp (ns), topic kind and raw CDR bytes."""

    log_ns: int
    stamp_ns: int
    kind: str  # 'cloud' | 'odom'
    raw: bytes


def _stamp_from_cdr(raw: bytes, msgtype: str) -> int:
    """Header stamp of a CDR message (both types start with std_msgs/Header)."""
    # CDR: 4-byte encapsulation header, then int32 sec, uint32 nanosec (little-endian for 0x0001).
    if len(raw) < 12:
        raise ReplayError(f'{msgtype}: message of {len(raw)} bytes is too short for a header')
    little = raw[1] == 1
    order = '<' if little else '>'
    sec, nsec = np.frombuffer(raw[4:12], dtype=np.dtype(f'{order}i4')).tolist()
    return int(sec) * 1_000_000_000 + int(nsec) % (2 ** 32)


def open_bag(bag: Path, topic: str, odom: str | None) -> tuple[Any, list[BagMessage], int]:
    """Check the bag and return (BagInfo, odometry messages, number of clouds).

    Clouds are streamed later by :func:`iter_messages` (a KITTI bag holds ~2 MB per cloud).
    """
    from zeroflow_ros.data.bag import BagError, _open_source
    try:
        src = _open_source(resolve_bag(bag))
    except BagError as exc:
        raise ReplayError(str(exc)) from None
    info = src.info
    src.close()
    topics = info.describe_topics()
    if info.message_count == 0 or not info.topics:
        raise ReplayError(f'{bag}: the bag is empty; it has {topics}')
    for name, msgtype, what in ((topic, POINTCLOUD2, '--topic'), (odom, ODOMETRY, '--odom')):
        if name is None:
            continue
        if name not in info.topics:
            raise ReplayError(f'{bag}: {what} {name!r} is not in the bag; it has {topics}')
        have = info.topics[name].msgtype
        if have != msgtype:
            raise ReplayError(f'{bag}: {what} {name!r} has type {have}, expected {msgtype}; '
                              f'the bag has {topics}')
        if info.topics[name].count == 0:
            raise ReplayError(f'{bag}: {what} {name!r} has no messages; the bag has {topics}')
    odom_msgs = list(_raw(bag, odom, 'odom')) if odom else []
    return info, odom_msgs, info.topics[topic].count


def resolve_bag(bag: Path) -> Path:
    """``OUT.mcap`` as ``zeroflow data to-bag`` and ``--record`` write it: the folder ``OUT/``."""
    bag = Path(bag)
    if not bag.exists() and bag.suffix in ('.mcap', '.db3') and bag.with_suffix('').is_dir():
        return bag.with_suffix('')
    return bag


def _raw(bag: Path, topic: str, kind: str) -> Iterator[BagMessage]:
    """Raw messages of one topic in log order; a read error ends the stream with a warning (truncation)."""
    from zeroflow_ros.data.bag import _open_source
    src = _open_source(resolve_bag(bag))
    k = 0
    try:
        it = src.raw_messages(topic)
        while True:
            try:
                log_ns, msgtype, raw = next(it)
            except StopIteration:
                return
            except Exception as exc:  # storage errors of a cut-short file: replay up to the break
                log.warning('%s: cannot read message %d of %s (%s: %s); replaying the %d before the break',
                            bag, k, topic, type(exc).__name__, exc, k)
                return
            yield BagMessage(int(log_ns), _stamp_from_cdr(bytes(raw), msgtype), kind, bytes(raw))
            k += 1
    finally:
        src.close()


def iter_messages(bag: Path, topic: str, odom_msgs: list[BagMessage]) -> Iterator[BagMessage]:
    """Clouds in log order, each preceded by the odometry up to and just past its stamp.

    The node interpolates the pose at the cloud stamp, so it needs one odometry message at or
    after it; sending it first (instead of waiting for its log time) saves the node's odometry wait.
    """
    pending = sorted(odom_msgs, key=lambda m: (m.log_ns, m.stamp_ns))
    i = 0
    for cloud in _raw(bag, topic, 'cloud'):
        while i < len(pending) and (pending[i].log_ns <= cloud.log_ns
                                    or pending[i].stamp_ns <= cloud.stamp_ns):
            yield pending[i]
            i += 1
        if i < len(pending) and (i == 0 or pending[i - 1].stamp_ns < cloud.stamp_ns):
            yield pending[i]
            i += 1
        yield cloud


# ------------------------------------------------------------------------------------- config

@dataclass
class ReplayConfig:
    bag: Path
    topic: str = '/lidar'
    odom: str | None = None
    rate: float = 1.0
    record: Path | None = None
    no_node: bool = False
    params_file: Path | None = None
    node_name: str = DEFAULT_NODE_NAME
    node_params: list[str] = field(default_factory=list)  # 'name:=value' passed to the node as -p
    timeout: float = 60.0          # node start-up + discovery
    frame_timeout: float = 10.0    # per flow at --rate 0, and for the last flow at any rate
    node_log: Path | None = None   # node process output (default: a temp file, shown on failure)
    max_sweeps: int | None = None  # replay only the first N clouds
    fastdds_profile: bool = True   # use config/fastdds_large_data.xml when the env sets none

    def __post_init__(self) -> None:
        self.bag = Path(self.bag)
        if self.rate < 0:
            raise ReplayError(f'--rate {self.rate}: expected >= 0 (0 = as fast as the node keeps up)')
        if self.timeout <= 0 or self.frame_timeout <= 0:
            raise ReplayError('--timeout and --frame-timeout must be > 0 seconds')
        if not self.node_name or '/' in self.node_name:
            raise ReplayError(f'--node-name {self.node_name!r}: expected a plain node name (no namespace)')
        for p in self.node_params:
            if ':=' not in p:
                raise ReplayError(f'--node-param {p!r}: expected NAME:=VALUE')
        if self.max_sweeps is not None and self.max_sweeps < 1:
            raise ReplayError(f'--max-sweeps {self.max_sweeps}: expected >= 1')
        if self.params_file is not None and not Path(self.params_file).is_file():
            raise ReplayError(f'--params-file {self.params_file}: no such file')


@dataclass
class FrameResult:
    """The flow of one sweep as it came back from the node."""

    index: int            # sweep index in the bag (0-based)
    stamp_ns: int
    points: int
    dynamic: int
    latency_ms: float     # publish of sweep index+1 -> flow of sweep index received (wall)
    node_total_ms: float  # the node's own ~/debug/total_ms for it (nan if not received)


@dataclass
class ReplaySummary:
    sweeps_in: int = 0
    flows_out: int = 0
    expected: int = 0
    dropped: int = 0
    frame_timeouts: int = 0
    truncated: bool = False
    latencies_ms: list[float] = field(default_factory=list)
    node_total_ms: list[float] = field(default_factory=list)
    backend: str = 'unknown'
    device: str = ''
    node_diagnostics: dict[str, str] = field(default_factory=dict)
    record: Path | None = None
    recorded: dict[str, int] = field(default_factory=dict)
    frames: list[FrameResult] = field(default_factory=list)
    wall_s: float = 0.0

    @staticmethod
    def _pct(values: list[float], q: float) -> float:
        v = [x for x in values if np.isfinite(x)]
        return float(np.percentile(v, q)) if v else float('nan')

    @property
    def latency_p50(self) -> float:
        return self._pct(self.latencies_ms, 50)

    @property
    def latency_p99(self) -> float:
        return self._pct(self.latencies_ms, 99)

    def line(self) -> str:
        node = self._pct(self.node_total_ms, 50)
        dev = f'/{self.device}' if self.device else ''
        d = self.node_diagnostics
        node_side = ''
        if self.dropped and d:
            node_side = (f" (node: received {d.get('messages_received', '?')}, dropped stale "
                         f"{d.get('dropped_stale', '?')}, pair resets {d.get('resets.gap', 0)})")
        return (f'replay: sweeps in {self.sweeps_in}, flows out {self.flows_out}/{self.expected}, '
                f'dropped {self.dropped}{node_side}, frame timeouts {self.frame_timeouts}, '
                f'latency p50 {self.latency_p50:.1f} ms p99 {self.latency_p99:.1f} ms '
                f'(node total p50 {node:.1f} ms), backend {self.backend}{dev}'
                + (', bag truncated' if self.truncated else ''))

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.update(latency_p50_ms=self.latency_p50, latency_p99_ms=self.latency_p99)
        d['record'] = str(self.record) if self.record else None
        return d


# ------------------------------------------------------------------------------------ helpers

def find_fastdds_profile() -> Path | None:
    """config/fastdds_large_data.xml from the installed share dir or the source tree."""
    candidates = []
    with contextlib.suppress(Exception):
        from ament_index_python.packages import get_package_share_directory
        share = Path(get_package_share_directory('zeroflow_ros'))
        candidates.append(share / 'config' / 'fastdds_large_data.xml')
    candidates.append(Path(__file__).resolve().parent.parent / 'config' / 'fastdds_large_data.xml')
    candidates.append(Path(sys.prefix) / 'share' / 'zeroflow_ros' / 'config' / 'fastdds_large_data.xml')
    return next((c for c in candidates if c.is_file()), None)


def node_command(cfg: ReplayConfig) -> list[str]:
    """Return the ``zeroflow node`` command line the replay starts."""
    cmd = [sys.executable, '-m', 'zeroflow_ros.cli', 'node']
    if cfg.params_file:
        cmd += ['--params-file', str(cfg.params_file)]
    cmd += ['--ros-args', '-r', f'__node:={cfg.node_name}', '-r', f'~/input/pointcloud:={cfg.topic}',
            '-p', 'use_sim_time:=true']
    if cfg.odom:
        cmd += ['-p', 'ego_motion:=odometry', '-r', f'~/input/odometry:={cfg.odom}']
    for p in cfg.node_params:
        cmd += ['-p', p]
    return cmd


def _diag_values(arr: Any, node_name: str) -> dict[str, str] | None:
    for st in arr.status:
        if st.name.startswith(f'/{node_name}:'):
            return {kv.key: kv.value for kv in st.values}
    return None


class _Recorder:
    """Writes received messages to an mcap bag (called from the executor thread only)."""

    def __init__(self, out: Path):
        from rosbags.rosbag2 import StoragePlugin, Writer

        from zeroflow_ros.data.bag import typestore
        out = Path(out)
        bag_dir = out.with_suffix('') if out.suffix == '.mcap' else out
        if bag_dir.exists():
            raise ReplayError(f'--record {bag_dir}: exists already; rosbag2 writers never overwrite '
                              '(remove it or pick another name)')
        self.path = bag_dir
        self._ts = typestore()
        self._writer = Writer(bag_dir, version=Writer.VERSION_LATEST, storage_plugin=StoragePlugin.MCAP)
        self._writer.open()
        self._conns: dict[str, Any] = {}
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._closed = False

    def write(self, topic: str, msgtype: str, msg: Any, log_ns: int) -> None:
        from rclpy.serialization import serialize_message
        raw = serialize_message(msg)
        with self._lock:
            if self._closed:
                return
            conn = self._conns.get(topic)
            if conn is None:
                conn = self._conns[topic] = self._writer.add_connection(topic, msgtype, typestore=self._ts)
            self._writer.write(conn, int(log_ns), raw)
            self.counts[topic] = self.counts.get(topic, 0) + 1

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._writer.close()


class _NodeProcess:
    """``zeroflow node`` in its own process group; stopped with SIGINT like Ctrl-C."""

    def __init__(self, cmd: list[str], env: dict[str, str], log_path: Path):
        self.cmd = cmd
        self.log_path = log_path
        self._fh = open(log_path, 'w')
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._fh, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors='replace')[-n:]
        except OSError:
            return ''

    def check_alive(self) -> None:
        rc = self.proc.poll()
        if rc is not None:
            raise ReplayError(f'zeroflow node exited with code {rc} ({" ".join(self.cmd)}); its log:\n'
                              + self.tail())

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning('zeroflow node did not stop on SIGINT within %.0f s; terminating', timeout)
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        self._fh.close()
        return self.proc.returncode


# ------------------------------------------------------------------------------------- replay

def replay(cfg: ReplayConfig, on_frame: Callable[[FrameResult], None] | None = None) -> ReplaySummary:
    """Replay ``cfg.bag`` through the node (see the module docstring); returns the summary."""
    info, odom_msgs, n_clouds = open_bag(cfg.bag, cfg.topic, cfg.odom)
    keys = ('FASTDDS_DEFAULT_PROFILES_FILE', 'ROS_DOMAIN_ID', 'ROS_AUTOMATIC_DISCOVERY_RANGE')
    saved = {k: os.environ.get(k) for k in keys}
    try:
        return _replay(cfg, info, odom_msgs, n_clouds, on_frame)
    finally:
        # The DDS settings below are for this replay's participants only (ours and the node's).
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _replay(cfg: ReplayConfig, info: Any, odom_msgs: list[BagMessage], n_clouds: int,
            on_frame: Callable[[FrameResult], None] | None) -> ReplaySummary:
    if cfg.fastdds_profile and not os.environ.get('FASTDDS_DEFAULT_PROFILES_FILE'):
        profile = find_fastdds_profile()
        if profile is not None:
            # Multi-megabyte clouds need the large shared-memory segment in both processes.
            os.environ['FASTDDS_DEFAULT_PROFILES_FILE'] = str(profile)

    from zeroflow_ros.testing import configure_ros_env
    domain = configure_ros_env(int(os.environ['ROS_DOMAIN_ID']) if os.environ.get('ROS_DOMAIN_ID') else None)
    recorder = _Recorder(cfg.record) if cfg.record else None
    node_proc = None
    tmp_log = None
    try:
        if not cfg.no_node:
            env = dict(os.environ)
            env.pop('_ROS_WHEELS_BOOTSTRAP_COMPLETE', None)
            if cfg.node_log is None:
                tmp_log = tempfile.NamedTemporaryFile(prefix='zeroflow_node_', suffix='.log', delete=False)
                tmp_log.close()
                log_path = Path(tmp_log.name)
            else:
                log_path = Path(cfg.node_log)
            cmd = node_command(cfg)
            log.info('starting %s (ROS_DOMAIN_ID=%d, log %s)', ' '.join(cmd), domain, log_path)
            node_proc = _NodeProcess(cmd, env, log_path)
        with _ros_context(domain) as ctx:
            summary = _replay_in_context(cfg, ctx, odom_msgs, n_clouds, int(info.start_ns), recorder,
                                         node_proc, on_frame)
    finally:
        if recorder is not None:
            recorder.close()
        if node_proc is not None:
            rc = node_proc.stop()
            if rc not in (0, None, -signal.SIGINT):
                log.warning('zeroflow node exited with code %s; log tail:\n%s', rc, node_proc.tail(1500))
        if tmp_log is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_log.name)
    if recorder is not None:
        summary.record = recorder.path
        summary.recorded = dict(recorder.counts)
    return summary


def _replay_in_context(cfg: ReplayConfig, ctx: Any, odom_msgs: list[BagMessage], n_clouds: int, start_ns: int,
                       recorder: _Recorder | None, node_proc: _NodeProcess | None,
                       on_frame: Callable[[FrameResult], None] | None) -> ReplaySummary:
    import rclpy
    from diagnostic_msgs.msg import DiagnosticArray
    from nav_msgs.msg import Odometry
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
    from rclpy.serialization import deserialize_message
    from rosgraph_msgs.msg import Clock
    from sensor_msgs.msg import PointCloud2
    from std_msgs.msg import Float64
    from visualization_msgs.msg import Marker

    from zeroflow_ros.testing import wait_for

    name = cfg.node_name
    flow_topic = f'/{name}/output/flow'
    marker_topic = f'/{name}/output/flow_markers'
    node = rclpy.create_node('zeroflow_replay', context=ctx)
    lock = threading.Lock()
    clock_ns = [0]  # the replay clock (bag time), log time of recorded messages
    flows: dict[int, tuple[float, int, int]] = {}  # stamp -> (recv wall time, points, dynamic)
    flow_order: list[int] = []       # stamps in arrival order
    node_total: dict[int, float] = {}  # stamp -> the node's ~/debug/total_ms
    diag: dict[str, str] = {}
    flow_event = threading.Event()

    def on_flow(msg: Any) -> None:
        t = time.monotonic()
        stamp = int(msg.header.stamp.sec) * 1_000_000_000 + int(msg.header.stamp.nanosec)
        dyn = _count_dynamic(msg)
        with lock:
            flows[stamp] = (t, int(msg.width) * int(msg.height), dyn)
            flow_order.append(stamp)
        if recorder is not None:
            recorder.write(flow_topic, POINTCLOUD2, msg, clock_ns[0])
        flow_event.set()

    def on_marker(msg: Any) -> None:
        if recorder is not None:
            recorder.write(marker_topic, MARKER, msg, clock_ns[0])

    def on_diag(msg: Any) -> None:
        values = _diag_values(msg, name)
        if values is None:
            return
        with lock:
            diag.clear()
            diag.update(values)
        if recorder is not None:
            recorder.write('/diagnostics', DIAGNOSTICS, msg, clock_ns[0])

    def on_debug(key: str) -> Callable[[Any], None]:
        topic = f'/{name}/debug/{key}_ms'

        def cb(msg: Any) -> None:
            if key == 'total':
                # Float64 has no stamp: the node publishes it right after the flow it times, so
                # it belongs to the newest flow still without one (a lost one leaves a nan).
                with lock:
                    if flow_order and flow_order[-1] not in node_total:
                        node_total[flow_order[-1]] = float(msg.data)
            if recorder is not None:
                recorder.write(topic, FLOAT64, msg, clock_ns[0])
        return cb

    reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
    best_effort = QoSProfile(depth=10, reliability=ReliabilityPolicy.BEST_EFFORT,
                             history=HistoryPolicy.KEEP_LAST)
    # Subscriptions before publishers: once the node has subscribed to our cloud publisher it
    # has also discovered these readers (announced earlier), so it never skips a frame for want
    # of subscribers.
    flow_sub = node.create_subscription(PointCloud2, flow_topic, on_flow, reliable)
    marker_sub = node.create_subscription(Marker, marker_topic, on_marker, reliable)
    node.create_subscription(DiagnosticArray, '/diagnostics', on_diag, reliable)
    for key in DEBUG_TOPICS:
        node.create_subscription(Float64, f'/{name}/debug/{key}_ms', on_debug(key), best_effort)
    clock_pub = node.create_publisher(Clock, '/clock',
                                      QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE))
    cloud_pub = node.create_publisher(PointCloud2, cfg.topic, QoSProfile(
        depth=1, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST))
    odom_pub = node.create_publisher(Odometry, cfg.odom, QoSProfile(depth=100)) if cfg.odom else None

    executor = SingleThreadedExecutor(context=ctx)
    executor.add_node(node)
    spin_stop = threading.Event()

    def spin() -> None:
        while not spin_stop.is_set() and rclpy.ok(context=ctx):
            executor.spin_once(timeout_sec=0.05)

    spinner = threading.Thread(target=spin, name='zeroflow_replay_spin', daemon=True)
    spinner.start()
    summary = ReplaySummary()
    t_start = time.monotonic()
    try:
        def alive_and(pred: Callable[[], bool]) -> Callable[[], bool]:
            def check() -> bool:
                if node_proc is not None:
                    node_proc.check_alive()
                return pred()
            return check

        waits = [(flow_sub, 'get_publisher_count', flow_topic),
                 (marker_sub, 'get_publisher_count', marker_topic),
                 (cloud_pub, 'get_subscription_count', cfg.topic)]
        if node_proc is not None:
            # Our own node: it follows /clock, and subscribes to odometry only with --odom.
            waits.append((clock_pub, 'get_subscription_count', '/clock'))
            if odom_pub is not None:
                waits.append((odom_pub, 'get_subscription_count', cfg.odom))
        for ent, method, topic in waits:
            if not wait_for(alive_and(lambda e=ent, m=method: getattr(e, m)() >= 1), cfg.timeout, 0.02):
                what = 'publisher' if method == 'get_publisher_count' else 'subscriber'
                raise ReplayError(
                    f'no {what} on {topic} after {cfg.timeout:.0f} s (node {name!r}, '
                    f"ROS_DOMAIN_ID={os.environ.get('ROS_DOMAIN_ID')}); "
                    + ('is the node running with that name and input topic?' if node_proc is None
                       else 'node log:\n' + node_proc.tail()))

        def publish_clock(ns: int) -> None:
            clock_ns[0] = max(clock_ns[0], ns)
            m = Clock()
            m.clock.sec, m.clock.nanosec = divmod(clock_ns[0], 1_000_000_000)
            clock_pub.publish(m)

        # Readiness: a diagnostics message proves the node is built, spinning and has matched
        # our readers (our side matching alone does not say that about its side). Its timer runs
        # on sim time: it fires once /clock reaches the bag's start.
        publish_clock(max(start_ns, 0))
        if not wait_for(alive_and(lambda: bool(diag)), min(cfg.timeout, 10.0), 0.02):
            log.info('no diagnostics from %s yet; starting anyway', name)
        log.info('node %s matched; replaying %d clouds at rate %s', name, n_clouds, cfg.rate or 'max')

        stamps: list[int] = []
        sent_at: dict[int, float] = {}   # stamp -> wall time it was published
        t0_wall = None
        t0_log = None

        for bm in iter_messages(cfg.bag, cfg.topic, odom_msgs):
            if cfg.max_sweeps is not None and bm.kind == 'cloud' and len(stamps) >= cfg.max_sweeps:
                break
            if node_proc is not None:
                node_proc.check_alive()
            if bm.kind == 'odom':
                # No clock step here: it may run ahead of its cloud (see iter_messages).
                odom_pub.publish(deserialize_message(bm.raw, Odometry))
                continue
            if stamps and bm.stamp_ns <= stamps[-1]:
                # Flows are matched to clouds by stamp, and the node would reset its pair anyway.
                raise ReplayError(f'{cfg.bag}: header stamps of {cfg.topic} not increasing at cloud '
                                  f'{len(stamps)} ({stamps[-1]} then {bm.stamp_ns} ns)')
            try:
                msg = deserialize_message(bm.raw, PointCloud2)
            except Exception as exc:
                raise ReplayError(f'{cfg.bag}: cloud {len(stamps)} on {cfg.topic} does not deserialise as '
                                  f'{POINTCLOUD2}: {type(exc).__name__}: {exc}') from None
            # Pacing.
            if t0_wall is None:
                t0_wall, t0_log = time.monotonic(), bm.log_ns
            elif cfg.rate > 0:
                due = t0_wall + (bm.log_ns - t0_log) / 1e9 / cfg.rate
                time.sleep(max(0.0, due - time.monotonic()))
            else:
                prev = stamps[-1]
                if len(stamps) >= 2:
                    # Lossless: the flow of sweep k-2 is published once the node finished sweep k-1.
                    want = stamps[-2]
                    ok = wait_for(alive_and(lambda w=want: w in flows), cfg.frame_timeout, 0.002)
                    if not ok:
                        summary.frame_timeouts += 1
                        log.warning('no flow for sweep %d (stamp %d) within %.1f s', len(stamps) - 2, want,
                                    cfg.frame_timeout)
                else:
                    # First cloud of a pair: nothing comes back for it, keep its recorded interval.
                    gap_s = (bm.stamp_ns - prev) / 1e9
                    time.sleep(min(max(gap_s, 0.0), 1.0))
            publish_clock(max(bm.log_ns, bm.stamp_ns))
            sent_at[bm.stamp_ns] = time.monotonic()
            cloud_pub.publish(msg)
            stamps.append(bm.stamp_ns)

        summary.sweeps_in = len(stamps)
        wanted = n_clouds if cfg.max_sweeps is None else min(n_clouds, cfg.max_sweeps)
        summary.truncated = len(stamps) < wanted
        if summary.truncated:
            log.warning('%s: replayed %d of the %d clouds the bag index lists (truncated)', cfg.bag,
                        len(stamps), wanted)
        if not stamps:
            raise ReplayError(f'{cfg.bag}: no cloud on {cfg.topic} could be read')
        summary.expected = max(len(stamps) - 1, 0)
        # The last flow (sweep n-2) comes once the node processed sweep n-1.
        if len(stamps) >= 2:
            last = stamps[-2]
            if not wait_for(alive_and(lambda: last in flows), cfg.frame_timeout, 0.005):
                if cfg.rate == 0:
                    summary.frame_timeouts += 1
        # The node publishes markers and then the debug timings after each flow: wait for the
        # timing of the last one so the recording is complete (bounded: debug may be disabled).
        wait_for(lambda: all(s in node_total for s in list(flows)), min(5.0, cfg.frame_timeout), 0.005)
        # Let the diagnostics timer (sim time) fire once after the sequence: advance the clock.
        period = 1.0
        for p in cfg.node_params:
            if p.startswith('diagnostics_period_s:='):
                period = float(p.split(':=', 1)[1])
        end_clock = clock_ns[0]
        with lock:
            diag.clear()
        deadline = time.monotonic() + 5.0
        k = 1
        while time.monotonic() < deadline:
            publish_clock(end_clock + int(k * period * 1e9) + 1)
            if wait_for(lambda: bool(diag), 0.3, 0.01):
                break
            k += 1
        with lock:
            got = dict(flows)
            summary.node_diagnostics = dict(diag)
            totals = dict(node_total)
        index = {s: i for i, s in enumerate(stamps)}
        for stamp in sorted(got, key=lambda s: index.get(s, -1)):
            if stamp not in index:
                continue
            i = index[stamp]
            t_recv, npts, ndyn = got[stamp]
            nxt = stamps[i + 1] if i + 1 < len(stamps) else None
            lat = (t_recv - sent_at[nxt]) * 1e3 if nxt is not None else float('nan')
            fr = FrameResult(i, stamp, npts, ndyn, lat, totals.get(stamp, float('nan')))
            summary.frames.append(fr)
            summary.latencies_ms.append(lat)
            summary.node_total_ms.append(fr.node_total_ms)
            if on_frame is not None:
                on_frame(fr)
        summary.flows_out = len(summary.frames)
        summary.dropped = summary.expected - summary.flows_out
        summary.backend = summary.node_diagnostics.get('backend', 'unknown')
        summary.device = summary.node_diagnostics.get('device', '')
        if summary.backend == 'unknown' and node_proc is not None:
            summary.backend, summary.device = _backend_from_log(node_proc.tail(20000))
    finally:
        spin_stop.set()
        spinner.join(timeout=5)
        executor.shutdown()
        node.destroy_node()
    summary.wall_s = time.monotonic() - t_start
    return summary


@contextlib.contextmanager
def _ros_context(domain: int) -> Iterator[Any]:
    """Own rclpy context; argv is not passed, so our CLI words are never read as ROS remaps."""
    import rclpy
    from rclpy.context import Context
    ctx = Context()
    rclpy.init(args=['zeroflow_replay'], context=ctx, domain_id=domain)
    try:
        yield ctx
    finally:
        with contextlib.suppress(Exception):
            rclpy.shutdown(context=ctx)


def _backend_from_log(text: str) -> tuple[str, str]:
    """backend/device from the node's start-up line (``zeroflow_node ready: backend=... device=...``)."""
    for line in text.splitlines():
        if 'zeroflow_node ready:' in line:
            kv = dict(tok.split('=', 1) for tok in line.split() if '=' in tok)
            return kv.get('backend', 'unknown'), kv.get('device', '')
    return 'unknown', ''


def _count_dynamic(msg: Any) -> int:
    """Count the points with is_dynamic set (0 when the field is missing)."""
    from zeroflow_ros.core import pointcloud2 as pc2
    try:
        cloud = pc2.decode(msg, extra_fields=('is_dynamic',))
    except Exception:  # a recorder must not die on a message it only counts
        return 0
    return int(np.count_nonzero(cloud.extra['is_dynamic']))


# ---------------------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__
    parser.add_argument('bag', type=Path, metavar='BAG', help='rosbag2 folder, or a bare .mcap/.db3 file')
    parser.add_argument('--topic', default='/lidar', help='PointCloud2 topic of the bag (default /lidar)')
    parser.add_argument('--odom', default=None, help='nav_msgs/Odometry topic of the bag: the node then '
                        'uses it for ego motion (default: the node\'s own lidar odometry)')
    parser.add_argument('--rate', type=float, default=1.0,
                        help='playback speed factor (default 1.0); 0 = as fast as the node keeps up, '
                             'lossless')
    parser.add_argument('--record', type=Path, default=None, help='write the node outputs to OUT.mcap')
    parser.add_argument('--no-node', action='store_true', help='feed an already running node instead of '
                        'starting one (it must use use_sim_time:=true and read --topic)')
    parser.add_argument('--params-file', type=Path, default=None, help='ROS parameter YAML for the node')
    parser.add_argument('--node-name', default=DEFAULT_NODE_NAME, help='node name (default zeroflow_node)')
    parser.add_argument('--node-param', action='append', default=[], metavar='NAME:=VALUE',
                        help='extra node parameter (repeatable), e.g. --node-param backend:=torch')
    parser.add_argument('--timeout', type=float, default=60.0,
                        help='seconds to wait for the node to come up and match (default 60)')
    parser.add_argument('--frame-timeout', type=float, default=10.0,
                        help='seconds to wait for each flow at --rate 0 and for the last one (default 10)')
    parser.add_argument('--node-log', type=Path, default=None, help='write the node process output here')
    parser.add_argument('--max-sweeps', type=int, default=None, help='replay only the first N clouds')
    parser.add_argument('--json', type=Path, default=None,
                        help='also write the summary and per-sweep figures to this JSON file')


def config_from_args(args: argparse.Namespace) -> ReplayConfig:
    return ReplayConfig(bag=args.bag, topic=args.topic, odom=args.odom, rate=args.rate, record=args.record,
                        no_node=args.no_node, params_file=args.params_file, node_name=args.node_name,
                        node_params=list(args.node_param), timeout=args.timeout,
                        frame_timeout=args.frame_timeout, node_log=args.node_log, max_sweeps=args.max_sweeps)


def print_frame(fr: FrameResult) -> None:
    print(f'sweep {fr.index:4d} stamp {fr.stamp_ns} points {fr.points:7d} dynamic {fr.dynamic:6d} '
          f'latency {fr.latency_ms:7.1f} ms node {fr.node_total_ms:7.1f} ms', flush=True)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
        summary = replay(cfg, on_frame=print_frame)
    except ReplayError as exc:
        print(f'zeroflow replay: {exc}', file=sys.stderr)
        return 2
    if summary.record:
        counts = ', '.join(f'{t} {n}' for t, n in sorted(summary.recorded.items()))
        print(f'recorded {summary.record}: {counts}')
    print(summary.line())
    if args.json:
        write_json(summary, args.json)
    return 0 if summary.flows_out > 0 or summary.expected == 0 else 1


def write_json(summary: ReplaySummary, path: Path) -> None:
    """Summary and per-sweep figures as JSON (NaN written as null)."""
    import json
    import math

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        if isinstance(v, Path):
            return str(v)
        return v
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(clean(summary.as_dict()), indent=1))
