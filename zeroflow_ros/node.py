"""ROS 2 node: PointCloud2 in, per-point residual scene flow out (the only module importing rclpy).

Topics (all relative to the node, remappable):

* in  ``~/input/pointcloud`` (sensor_msgs/PointCloud2), keep-last ``input_depth`` (1); reliability
  ``auto`` follows the publisher's offered QoS (as ``ros2 bag record`` does), or forced.
* in  ``~/input/odometry`` (nav_msgs/Odometry), only with ``ego_motion: odometry``.
* out ``~/output/flow`` (PointCloud2: x, y, z, flow_x, flow_y, flow_z, speed float32, is_dynamic
  uint8) with sweep t's header, published when sweep t+1 arrives; reliable, depth 1.
* out ``~/output/flow_markers`` (visualization_msgs/Marker LINE_LIST), ``/diagnostics``,
  ``~/debug/{preprocess,inference,postprocess,total}_ms`` and ``~/debug/pipeline_latency_ms``
  (std_msgs/Float64, best-effort). ``pipeline_latency_ms`` is node-clock now minus the stamp of the
  newest sweep (t+1), i.e. the delay the node adds after the sensor delivered the data it needed.

Threading: the subscription callback only stores the newest message (latest wins, an unprocessed
one is dropped and counted). Two worker threads form a bounded pipeline: the *sweep* worker decodes
each message and does its per-sweep work once (:meth:`~zeroflow_ros.pipeline.Pipeline.prepare`:
checks, ground, lidar odometry, pillars); the *pair* worker runs the network on the pair that
completes (:meth:`~zeroflow_ros.pipeline.Pipeline.run_pair`) and publishes, while the sweep worker
already prepares the next sweep. Between them is one slot, latest wins (a pair replaced before the
pair worker took it is a dropped flow, counted): at most one message and one pair wait. Bad input
never stops the node: it is logged (throttled), counted by kind in the
diagnostics, and that sweep produces no output.

Clouds above ``max_points`` are clipped to an evenly strided subset (input order kept) and
reported (``clipped`` in diagnostics); the flow output then holds the kept points only.
"""
from __future__ import annotations

import argparse
import collections
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import rclpy
from rcl_interfaces.msg import (FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType,
                                SetParametersResult)
from rclpy.clock import Clock, ClockType
from rclpy.exceptions import ParameterException
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.qos_overriding_options import QoSOverridingOptions

from zeroflow_ros import pipeline as pl
from zeroflow_ros import visualization as vis

NODE_NAME = 'zeroflow_node'
RELIABILITIES = ('auto', 'reliable', 'best_effort')
_DEBUG_TOPICS = ('preprocess', 'inference', 'postprocess', 'total')
# Bad input that drops a sweep and counts as an error; other resets (gap) are normal operation.
_ERROR_RESETS = ('frame_id_changed', 'stamp_backwards')

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Parameters: one table, so the YAML file, the launch test and the node agree.
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Param:
    name: str
    default: Any
    description: str
    read_only: bool = True
    choices: tuple[str, ...] = ()
    range: tuple[float, float] | None = None


PARAMS: tuple[Param, ...] = (
    Param('input_topic', '~/input/pointcloud', 'PointCloud2 input topic (also remappable)'),
    Param('odometry_topic', '~/input/odometry',
          'nav_msgs/Odometry input topic, used with ego_motion=odometry'),
    Param('input_reliability', 'auto', 'input QoS reliability; auto follows the publisher (polls until one '
          'appears, re-checks when it changes)', choices=RELIABILITIES),
    Param('input_depth', 1, 'input QoS keep-last depth (1: a stale frame is worse than a dropped one)',
          range=(1, 100)),
    Param('model', 'models/default', 'model dir (manifest.yaml) / .onnx / .pt / .engine; relative paths '
          'resolve in the package share dir, then the source tree'),
    Param('backend', 'auto', 'inference backend', choices=pl.BACKENDS),
    Param('device', 'auto', 'inference device', choices=pl.DEVICES),
    Param('precision', 'fp32', 'inference precision (fp16: TensorRT / CUDA only; int8: onnxruntime CPU '
          "with the model's model.int8.onnx, opt-in: ~25 % less CPU, +1.4 % EPE, +10 % static EPE)",
          choices=pl.PRECISIONS),
    Param('point_range_m', [-51.2, -51.2, -3.0, 51.2, 51.2, 3.0], 'scored box in the sensor frame '
          '[x_min, y_min, z_min, x_max, y_max, z_max] (m); the model also ignores points outside its grid'),
    Param('ground_removal', 'geometric', 'ground removal before the model (geometric: map-less, per-cell)',
          choices=pl.GROUND_MODES),
    Param('ego_motion', 'lidar', 'ego motion source: odometry topic, built-in lidar odometry (KISS-ICP), '
          'or none (static sensor)', choices=pl.EGO_MOTION_SOURCES),
    Param('sensor_in_base_xyz', [0.0, 0.0, 0.0], 'cloud frame origin in the vehicle base frame (m; base_link '
          'on the ground under the rear axle, as AV2/Autoware). The model sees clouds in that frame, '
          'as in training (e.g. [0, 0, 1.73] for a lidar 1.73 m up); odometry poses are of it'),
    Param('sensor_in_base_rpy', [0.0, 0.0, 0.0], 'cloud frame orientation in the vehicle base frame '
          '(roll, pitch, yaw rad); see sensor_in_base_xyz'),
    Param('odometry_wait_s', 0.05, 'how long to wait for odometry covering a cloud stamp', range=(0.0, 2.0)),
    Param('inference_threads', 0, 'CPU threads per inference session (0: half the cores; the network runs '
          'on two workers at once, its sweep part and its pair part)', range=(0, 256)),
    Param('motion_evidence', True, 'zero the flow of objects whose motion sweep t+1 does not support better '
          'than zero flow (false motion of static surfaces re-sampled by a moving lidar; about half the '
          'network\'s CPU time)'),
    Param('max_sweep_gap_s', 0.35, 'a larger gap between sweeps (or a jump backwards) starts a new pair',
          range=(0.01, 10.0)),
    Param('max_points', 200000, 'clouds above this are clipped to an evenly strided subset and reported',
          range=(1, 10_000_000)),
    Param('dynamic_threshold_mps', 0.5, 'speed (m/s) above which a scored point is dynamic',
          range=(0.0, 100.0)),
    Param('publish_markers', True, 'publish ~/output/flow_markers', read_only=False),
    Param('marker_decimation', 4, 'draw every n-th dynamic point', read_only=False, range=(1, 1000)),
    # Markers are built in Python (one object per vertex) on the pair worker: 5000 arrows took
    # ~110 ms per flow on the loaded 2-core CPU, 2000 ~23 ms; rviz shows the motion as well.
    Param('marker_max_arrows', 2000, 'upper bound of arrows per marker', read_only=False, range=(1, 100000)),
    Param('marker_length_scale', 1.0, 'arrow length = scale x flow over one sweep interval', read_only=False,
          range=(0.01, 100.0)),
    Param('marker_line_width', 0.05, 'arrow line width (m)', read_only=False, range=(0.001, 5.0)),
    Param('marker_max_speed_mps', 15.0, 'speed shown red (colour scale top)', read_only=False,
          range=(0.1, 100.0)),
    Param('publish_debug', True, 'publish ~/debug/* timing topics', read_only=False),
    Param('latency_budget_ms', 100.0, 'receive-to-publish latency above this is WARN in diagnostics',
          read_only=False, range=(1.0, 10000.0)),
    Param('error_after_s', 5.0, 'over budget or failing for longer than this is ERROR in diagnostics',
          read_only=False, range=(0.1, 3600.0)),
    Param('warmup_iterations', 3, 'backend calls on random points at start-up (first frames then run at '
          'full speed); 0 disables', range=(0, 100)),
    Param('diagnostics_period_s', 1.0, 'diagnostics publish period', range=(0.05, 60.0)),
    Param('pair_consecutive', True, 'under overload, feed the sweep received just before the processed one '
          '(pre-processing only) so flow always spans one sweep interval; false: pair with the last '
          'processed sweep (cheaper, longer and variable interval)', read_only=False),
    Param('skip_when_no_subscribers', True, 'skip inference while nobody subscribes to the outputs',
          read_only=False),
)
PARAM_NAMES = tuple(p.name for p in PARAMS)


def _descriptor(p: Param) -> ParameterDescriptor:
    d = ParameterDescriptor(description=p.description, read_only=p.read_only)
    if p.choices:
        d.additional_constraints = 'one of: ' + ', '.join(p.choices)
    if p.range is not None:
        if isinstance(p.default, bool):
            pass
        elif isinstance(p.default, int):
            d.integer_range = [IntegerRange(from_value=int(p.range[0]), to_value=int(p.range[1]), step=0)]
        else:
            d.floating_point_range = [FloatingPointRange(from_value=float(p.range[0]),
                                                         to_value=float(p.range[1]), step=0.0)]
    d.type = {bool: ParameterType.PARAMETER_BOOL, int: ParameterType.PARAMETER_INTEGER,
              float: ParameterType.PARAMETER_DOUBLE, str: ParameterType.PARAMETER_STRING,
              list: ParameterType.PARAMETER_DOUBLE_ARRAY}[type(p.default)]
    return d


def _stamp_ns(stamp: Any) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


# --------------------------------------------------------------------------------------------
# Statistics shared by the callback, the worker and the diagnostics timer
# --------------------------------------------------------------------------------------------

@dataclass
class NodeStats:
    received: int = 0
    processed: int = 0
    published: int = 0
    dropped_stale: int = 0
    dropped_pairs: int = 0        # of dropped_stale: pairs replaced before the network took them
    skipped_no_subscribers: int = 0
    clipped: int = 0
    odometry_received: int = 0
    errors: collections.Counter = field(default_factory=collections.Counter)
    resets: collections.Counter = field(default_factory=collections.Counter)
    latencies_ms: collections.deque = field(default_factory=lambda: collections.deque(maxlen=200))
    totals_ms: collections.deque = field(default_factory=lambda: collections.deque(maxlen=200))
    # per published flow: ms per stage (decode, check, ground, odometry, sweep_pillars, sweep_encoder,
    # pair_points, network, scatter, encode, publish), for benches; markers on their own worker
    stages_ms: collections.deque = field(default_factory=lambda: collections.deque(maxlen=200))
    marker_ms: collections.deque = field(default_factory=lambda: collections.deque(maxlen=200))
    publish_times: collections.deque = field(default_factory=lambda: collections.deque(maxlen=200))
    receive_times: collections.deque = field(default_factory=lambda: collections.deque(maxlen=200))
    last_total_ms: float = float('nan')
    last_error: str = ''
    last_error_time: float = 0.0
    last_success_time: float = 0.0
    first_error_since_success: float = 0.0
    over_budget_since: float = 0.0

    @property
    def errors_total(self) -> int:
        return sum(self.errors.values())


def _rate(times: collections.deque, now: float, window_s: float = 5.0) -> float:
    recent = [t for t in times if now - t <= window_s]
    if len(recent) < 2:
        return 0.0
    return (len(recent) - 1) / max(recent[-1] - recent[0], 1e-9)


class _SlotWorker:
    """One thread fed through a one-item slot: a new item replaces one still waiting (latest wins)."""

    def __init__(self, name: str, fn: Any, stop: threading.Event):
        self._fn = fn
        self._stop = stop
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._item: Any = None
        self._busy = False
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._wake.set()  # the loop sees the shared stop event at once

    def put(self, item: Any) -> bool:
        """Hand an item over; True when it replaced one that was still waiting."""
        with self._lock:
            replaced = self._item is not None
            self._item = item
        self._wake.set()
        return replaced

    def idle(self) -> bool:
        with self._lock:
            return self._item is None and not self._busy

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self._wake.wait(0.1):
                continue
            with self._lock:
                item, self._item = self._item, None
                self._wake.clear()
                self._busy = item is not None
            if item is None:
                continue
            try:
                self._fn(item)
            except Exception:  # the callers guard their own work; never let the thread die
                log.exception('%s: unexpected error', self.thread.name)
            finally:
                with self._lock:
                    self._busy = False


class ZeroFlowNode(Node):
    """Scene-flow node; see the module docstring for topics and behaviour."""

    def __init__(self, node_name: str = NODE_NAME, *, backend: Any = None, **kwargs: Any):
        super().__init__(node_name, **kwargs)
        # Set first: rclpy destroys a half-built node at shutdown if the constructor raises.
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._worker: threading.Thread | None = None
        # (job, t0, t_recv, decode_ms) -> network + publish; a frame -> markers (best effort)
        self._pairs = _SlotWorker('zeroflow_pair', lambda item: self._run_pair(*item), self._stop)
        self._markers = _SlotWorker('zeroflow_markers', self._publish_markers, self._stop)
        for p in PARAMS:
            self.declare_parameter(p.name, p.default, _descriptor(p))
        self._check_choices()
        self.add_on_set_parameters_callback(self._on_set_parameters)
        v = {p.name: self.get_parameter(p.name).value for p in PARAMS}

        self.config = pl.PipelineConfig.from_dict(v)
        pl.limit_blas_threads(1)
        self.pipeline = pl.Pipeline(self.config, backend=backend)
        if v['warmup_iterations'] > 0 and hasattr(self.pipeline.backend, 'warmup'):
            self.pipeline.backend.warmup(iterations=v['warmup_iterations'])
        self.stats = NodeStats()
        self._lock = threading.Lock()
        self._slot: tuple[int, Any, float, tuple[int, Any] | None] | None = None
        self._last: tuple[int, Any] | None = None
        self._seq = 0          # messages received (callback side)
        self._used_seq = 0     # newest message fed to the pipeline (worker side)
        self._warn_times: dict[str, float] = {}
        self._busy = False     # the sweep worker holds a message
        self._idle = False     # the last message was skipped: nobody subscribes

        self.poses = pl.PoseBuffer(base_T_sensor=self.config.base_T_sensor)

        # Reliable depth 1 by default; a deployment may change it from YAML
        # (qos_overrides./<node>/output/flow.publisher.{reliability,depth,history}).
        self._flow_pub = self.create_publisher(
            _msgs().PointCloud2, '~/output/flow',
            QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST),
            qos_overriding_options=QoSOverridingOptions.with_default_policies())
        self._marker_pub = self.create_publisher(
            _msgs().Marker, '~/output/flow_markers',
            QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST))
        self._diag_pub = self.create_publisher(_msgs().DiagnosticArray, '/diagnostics', 10)
        debug_qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.BEST_EFFORT,
                               history=HistoryPolicy.KEEP_LAST)
        self._debug_pubs = {k: self.create_publisher(_msgs().Float64, f'~/debug/{k}_ms', debug_qos)
                            for k in _DEBUG_TOPICS + ('pipeline_latency',)}

        self.input_topic = self.resolve_topic_name(v['input_topic'])
        self._sub = None
        self.reliability: str | None = None  # in use; None until subscribed
        self._waiting_logged = False
        # House-keeping timers run on the steady clock: with use_sim_time the ROS clock stands still
        # until /clock arrives, and a replayer waits for our subscription before it sends /clock.
        steady = Clock(clock_type=ClockType.STEADY_TIME)
        if v['input_reliability'] == 'auto':
            self._qos_timer = self.create_timer(0.5, self._ensure_subscription, clock=steady)
            self._ensure_subscription()
        else:
            self._subscribe(v['input_reliability'])
        self._odom_sub = None
        if self.config.ego_motion == 'odometry':
            self._odom_sub = self.create_subscription(
                _msgs().Odometry, v['odometry_topic'], self._on_odometry,
                QoSProfile(depth=50, reliability=ReliabilityPolicy.BEST_EFFORT,
                           history=HistoryPolicy.KEEP_LAST, durability=DurabilityPolicy.VOLATILE))
        self._diag_timer = self.create_timer(v['diagnostics_period_s'], self._publish_diagnostics,
                                             clock=steady)
        self._worker = threading.Thread(target=self._work, name='zeroflow_worker', daemon=True)
        self._worker.start()
        self._pairs.start()
        self._markers.start()

        d = self.pipeline.describe()
        b = d['backend']
        self._backend_name = str(b.get('backend', b.get('name')))
        self._backend_device = str(b.get('device'))
        self.get_logger().info(
            f"zeroflow_node ready: backend={b.get('backend', b.get('name'))} device={b.get('device')} "
            f"precision={b.get('precision', self.config.precision)} "
            f"model={b.get('model', self.config.model)} "
            f"grid={b.get('grid')} ego_motion={self.config.ego_motion} input={self.input_topic} "
            f"reliability={v['input_reliability']}")

    # -- parameters --------------------------------------------------------------------------
    def _check_choices(self) -> None:
        for p in PARAMS:
            if p.choices:
                value = self.get_parameter(p.name).value
                if value not in p.choices:
                    raise pl.PipelineError('config',
                                           f'parameter {p.name}={value!r}; expected one of {p.choices}')

    def _on_set_parameters(self, params: list) -> SetParametersResult:
        table = {p.name: p for p in PARAMS}
        for prm in params:
            spec = table.get(prm.name)
            if spec is not None and spec.choices and prm.value not in spec.choices:
                return SetParametersResult(successful=False,
                                           reason=f'{prm.name}: expected one of {spec.choices}')
        return SetParametersResult(successful=True)

    def _p(self, name: str) -> Any:
        return self.get_parameter(name).value

    # -- input QoS ---------------------------------------------------------------------------
    def _wanted_reliability(self) -> str | None:
        infos = self.get_publishers_info_by_topic(self.input_topic)
        if not infos:
            return None
        # One best-effort publisher is enough: a reliable subscription would not match it.
        if any(i.qos_profile.reliability == ReliabilityPolicy.BEST_EFFORT for i in infos):
            return 'best_effort'
        return 'reliable'

    def _ensure_subscription(self) -> None:
        wanted = self._wanted_reliability()
        if wanted is None:
            if self._sub is None and not self._waiting_logged:
                self.get_logger().debug(
                    f'waiting for a publisher on {self.input_topic} (input_reliability=auto)')
                self._waiting_logged = True
            return
        if wanted != self.reliability:
            self.get_logger().info(
                f'{"re-" if self._sub is not None else ""}subscribing {self.input_topic} {wanted}, '
                'as its publisher offers')
            self._subscribe(wanted)

    def _subscribe(self, reliability: str) -> None:
        if self._sub is not None:
            self.destroy_subscription(self._sub)
        qos = QoSProfile(depth=self._p('input_depth'), history=HistoryPolicy.KEEP_LAST,
                         durability=DurabilityPolicy.VOLATILE,
                         reliability=(ReliabilityPolicy.RELIABLE if reliability == 'reliable'
                                      else ReliabilityPolicy.BEST_EFFORT))
        self._sub = self.create_subscription(_msgs().PointCloud2, self.input_topic, self._on_cloud, qos)
        self.reliability = reliability

    # -- callbacks (no maths here) -----------------------------------------------------------
    def _on_cloud(self, msg: Any) -> None:
        now = time.monotonic()
        with self._lock:
            self.stats.received += 1
            self.stats.receive_times.append(now)
            self._seq += 1
            # Latest wins; the message before it is kept as its possible predecessor.
            self._slot = (self._seq, msg, now, self._last)
            self._last = (self._seq, msg)
        self._wake.set()

    def _on_odometry(self, msg: Any) -> None:
        p, q = msg.pose.pose.position, msg.pose.pose.orientation
        try:
            self.poses.add(_stamp_ns(msg.header.stamp), (p.x, p.y, p.z), (q.w, q.x, q.y, q.z))
            with self._lock:
                self.stats.odometry_received += 1
        except pl.PipelineError as exc:
            self._count_error(exc.kind, str(exc))

    # -- worker ------------------------------------------------------------------------------
    def _work(self) -> None:
        while not self._stop.is_set():
            if not self._wake.wait(0.1):
                continue
            with self._lock:
                item, self._slot = self._slot, None
                self._wake.clear()
                self._busy = item is not None
            if item is not None:
                self._process(*item)

    def _hand_over(self, job: Any, t0: float, t_recv: float, decode_ms: float) -> None:
        """Give a pair to the pair worker; one still waiting there is replaced (latest wins)."""
        if self._pairs.put((job, t0, t_recv, decode_ms)):
            with self._lock:
                # that sweep gets no flow: a stale drop like one at the input
                self.stats.dropped_pairs += 1
                self.stats.dropped_stale += 1

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until no message or pair is waiting or in work; False on timeout (tests and benches)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                idle = self._slot is None and not self._busy
                if idle and self._pairs.idle() and self._markers.idle():
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.001)

    def _has_subscribers(self) -> bool:
        return (self._flow_pub.get_subscription_count() > 0
                or (self._p('publish_markers') and self._marker_pub.get_subscription_count() > 0))

    def _process(self, seq: int, msg: Any, t_recv: float, pred: tuple[int, Any] | None) -> None:
        try:
            if self._p('skip_when_no_subscribers') and not self._has_subscribers():
                if self.pipeline.has_previous:
                    self.pipeline.reset('no_subscribers')
                with self._lock:
                    self.stats.skipped_no_subscribers += 1
                    self._idle = True
                self._used_seq = seq
                return
            self._idle = False
            t0 = time.perf_counter()
            used_pred = False
            if pred is not None and pred[0] > self._used_seq and self._p('pair_consecutive'):
                # Overload dropped the sweep just before this one: feed it first (pre-processing
                # only), so the flow still spans one sweep interval, as the model was trained.
                used_pred = self._guarded(lambda: self._step(pred[1], infer=False))
            with self._lock:
                self.stats.dropped_stale += max(0, seq - self._used_seq - 1 - int(used_pred))
            self._used_seq = seq
            self._guarded(lambda: self._step(msg, t0=t0, t_recv=t_recv))
        finally:
            with self._lock:
                self._busy = False

    def _guarded(self, fn: Any, count: bool = True) -> bool:
        """Run one sweep (or pair); bad input is counted by kind and logged (throttled), never raised."""
        from zeroflow_ros.core import pointcloud2 as pc2
        try:
            fn()
            return True
        except (pc2.CloudError, pl.PipelineError) as exc:
            kind = getattr(exc, 'kind', 'decode')
            self._count_error(kind, f'dropped cloud: {exc}')
        except Exception as exc:  # the node must survive anything a message can trigger
            self._count_error('internal', f'internal error on a cloud: {type(exc).__name__}: {exc}')
            log.debug('internal error', exc_info=True)
        finally:
            if count:
                with self._lock:
                    self.stats.processed += 1
        return False

    def _step(self, msg: Any, *, infer: bool = True, t0: float | None = None, t_recv: float = 0.0) -> None:
        """Decode one message, do its per-sweep work and hand the pair it completes to the pair worker."""
        from zeroflow_ros.core import pointcloud2 as pc2

        t0 = time.perf_counter() if t0 is None else t0
        t_dec = time.perf_counter()
        cloud = pc2.decode(msg)
        xyz = cloud.xyz
        if len(xyz) == 0 and cloud.n_input > 0:
            raise pl.PipelineError('all_nan', f'all {cloud.n_input} points have a NaN/inf coordinate; '
                                   'expected finite x, y, z')
        keep = pl.clip_indices(len(xyz), self.config.max_points)
        if keep is not None:
            with self._lock:
                self.stats.clipped += 1
            self._warn('clipped', f'cloud with {len(xyz)} points clipped to max_points='
                       f'{self.config.max_points} (evenly strided)')
            xyz = xyz[keep]
        stamp_ns = cloud.stamp_ns
        pose = None
        if self.config.ego_motion == 'odometry':
            pose = self.poses.wait_for(stamp_ns, self._p('odometry_wait_s'))
        decode_ms = (time.perf_counter() - t_dec) * 1e3
        with self._lock:
            waiting = self._slot[0] if self._slot is not None else 0
        # Behind (the waiting message is not the next one): this sweep will not be sweep t of the
        # next pair (that message's predecessor will be), so its share of the network would be
        # wasted. A predecessor (infer=False) is sweep t of the pair that follows: it is encoded.
        behind = infer and waiting > self._used_seq + 1 and self._p('pair_consecutive')
        job = self.pipeline.prepare(xyz, stamp_ns, pose, frame_id=cloud.frame_id, tag=msg.header,
                                    encode=not behind)
        reason = self.pipeline.last_reset_reason
        if reason is not None:
            with self._lock:
                self.stats.resets[reason] += 1
            if reason in _ERROR_RESETS:
                self._count_error(reason, f'{reason} at {stamp_ns} ns on {cloud.frame_id!r}: '
                                  'sweep starts a new pair, no flow for it')
        if job is not None and infer:
            self._hand_over(job, t0, t_recv, decode_ms)

    def _run_pair(self, job: Any, t0: float, t_recv: float, decode_ms: float) -> None:
        self._guarded(lambda: self._publish(self.pipeline.run_pair(job), t0, t_recv, decode_ms,
                                            job.cur.stamp_ns), count=False)

    def _publish_markers(self, frame: pl.FlowFrame) -> None:
        """Build and publish the arrows of one flow (marker worker: off the flow's latency path)."""
        t0 = time.perf_counter()
        verts, rgb = vis.arrow_segments(
            frame.points, frame.flow, frame.speed, frame.is_dynamic,
            decimation=self._p('marker_decimation'), length_scale=self._p('marker_length_scale'),
            max_arrows=self._p('marker_max_arrows'), max_speed=self._p('marker_max_speed_mps'))
        self._marker_pub.publish(
            vis.flow_marker(frame.tag, verts, rgb, line_width=self._p('marker_line_width')))
        with self._lock:
            self.stats.marker_ms.append((time.perf_counter() - t0) * 1e3)

    def _publish(self, frame: pl.FlowFrame, t0: float, t_recv: float, decode_ms: float,
                 stamp_ns: int) -> None:
        from zeroflow_ros.core import pointcloud2 as pc2

        t_post = time.perf_counter()
        fields = {
            'flow_x': frame.flow[:, 0], 'flow_y': frame.flow[:, 1], 'flow_z': frame.flow[:, 2],
            'speed': frame.speed, 'is_dynamic': frame.is_dynamic.astype(np.uint8),
        }
        out = pc2.encode(frame.points, fields, header=frame.tag)
        t_enc = time.perf_counter()
        self._flow_pub.publish(out)
        t_pub = time.perf_counter()
        if self._p('publish_markers') and self._marker_pub.get_subscription_count() > 0:
            # Markers are Python objects per arrow (GIL-bound, ~20 ms): their own worker, latest
            # wins, so they never delay the flow nor the next pair.
            self._markers.put(frame)
        now = time.monotonic()
        t_end = time.perf_counter()
        stages = {'decode': decode_ms, **frame.stages_ms, 'encode': (t_enc - t_post) * 1e3,
                  'publish': (t_pub - t_enc) * 1e3}
        timings = dict(frame.timings_ms)
        timings['preprocess'] += decode_ms
        timings['postprocess'] += (t_end - t_post) * 1e3
        timings['total'] = (t_end - t0) * 1e3
        latency_ms = (now - t_recv) * 1e3
        clock_now = self.get_clock().now().nanoseconds
        pipeline_latency_ms = (clock_now - stamp_ns) * 1e-6
        if self._p('publish_debug'):
            msg_cls = _msgs().Float64
            for k in _DEBUG_TOPICS:
                self._debug_pubs[k].publish(msg_cls(data=float(timings[k])))
            self._debug_pubs['pipeline_latency'].publish(msg_cls(data=float(pipeline_latency_ms)))
        budget = self._p('latency_budget_ms')
        with self._lock:
            s = self.stats
            s.published += 1
            s.publish_times.append(now)
            s.latencies_ms.append(latency_ms)
            s.totals_ms.append(timings['total'])
            s.stages_ms.append(stages)
            s.last_total_ms = timings['total']
            s.last_success_time = now
            s.first_error_since_success = 0.0
            if latency_ms > budget:
                s.over_budget_since = s.over_budget_since or now
            else:
                s.over_budget_since = 0.0
        if latency_ms > budget:
            self._warn('over_budget', f'latency {latency_ms:.1f} ms over budget {budget:.0f} ms '
                       f'(inference {timings["inference"]:.1f} ms, {len(frame.points)} points)')

    # -- errors, logging ---------------------------------------------------------------------
    def _count_error(self, kind: str, message: str) -> None:
        now = time.monotonic()
        with self._lock:
            s = self.stats
            s.errors[kind] += 1
            s.last_error = message
            s.last_error_time = now
            if not s.first_error_since_success:
                s.first_error_since_success = now
        self._warn(kind, message)

    def _warn(self, key: str, message: str, period_s: float = 5.0) -> None:
        """One warning per kind per period: a broken stream must not flood the log."""
        now = time.monotonic()
        last = self._warn_times.get(key)
        if last is not None and now - last < period_s:
            return
        self._warn_times[key] = now
        self.get_logger().warning(message)

    # -- diagnostics -------------------------------------------------------------------------
    def diagnostic_status(self) -> Any:
        """Build the node's one DiagnosticStatus (also used by tests)."""
        m = _msgs()
        now = time.monotonic()
        error_after = self._p('error_after_s')
        budget = self._p('latency_budget_ms')
        with self._lock:
            s = self.stats
            lat = np.array(s.latencies_ms, float) if s.latencies_ms else np.zeros(0)
            values = {
                'backend': self._backend_name,
                'device': self._backend_device,
                'precision': self.config.precision,
                'model': self.config.model,
                'ego_motion': self.config.ego_motion,
                'input_topic': self.input_topic,
                'input_reliability': str(self.reliability),
                'messages_received': s.received,
                'messages_processed': s.processed,
                'flows_published': s.published,
                'dropped_stale': s.dropped_stale,
                'dropped_pairs': s.dropped_pairs,
                'skipped_no_subscribers': s.skipped_no_subscribers,
                'clipped': s.clipped,
                'odometry_received': s.odometry_received,
                'input_rate_hz': round(_rate(s.receive_times, now), 2),
                'output_rate_hz': round(_rate(s.publish_times, now), 2),
                'latency_ms_p50': round(float(np.percentile(lat, 50)), 2) if len(lat) else float('nan'),
                'latency_ms_p99': round(float(np.percentile(lat, 99)), 2) if len(lat) else float('nan'),
                'latency_ms_last': round(float(lat[-1]), 2) if len(lat) else float('nan'),
                'last_total_ms': round(s.last_total_ms, 2),
                'processing_ms_p50': round(float(np.percentile(s.totals_ms, 50)), 2) if s.totals_ms
                else float('nan'),
                'latency_budget_ms': budget,
                'errors_total': s.errors_total,
            }
            for k, n in sorted(s.errors.items()):
                values[f'errors.{k}'] = n
            for k, n in sorted(s.resets.items()):
                values[f'resets.{k}'] = n
            failing_for = now - s.first_error_since_success if s.first_error_since_success else 0.0
            over_for = now - s.over_budget_since if s.over_budget_since else 0.0
            last_ok = s.last_success_time
            last_error = s.last_error
            received = s.received
            last_err_time = s.last_error_time

        level, message = 0, 'OK'
        if received == 0:
            message = 'waiting for first frame'
        elif self._idle:
            message = 'idle: nobody subscribes to the outputs (skip_when_no_subscribers)'
        elif failing_for > error_after and last_err_time > last_ok:
            level, message = 2, f'failing for {failing_for:.1f} s: {last_error}'
        elif over_for > error_after:
            level, message = 2, f'over latency budget ({budget:.0f} ms) for {over_for:.1f} s'
        elif over_for > 0:
            level, message = 1, f'over latency budget ({budget:.0f} ms)'
        elif last_err_time > last_ok and now - last_err_time < error_after:
            level, message = 1, f'recent input error: {last_error}'
        elif last_ok == 0:
            message = 'waiting for the second sweep of a pair'
        st = m.DiagnosticStatus()
        st.level = bytes([level])
        st.name = f'{self.get_fully_qualified_name()}: scene flow'
        st.message = message
        st.hardware_id = values['backend']
        st.values = [m.KeyValue(key=k, value=str(v)) for k, v in values.items()]
        return st

    def _publish_diagnostics(self) -> None:
        m = _msgs()
        arr = m.DiagnosticArray()
        arr.header.stamp = self.get_clock().now().to_msg()
        arr.status = [self.diagnostic_status()]
        self._diag_pub.publish(arr)

    # -- lifecycle ---------------------------------------------------------------------------
    def destroy_node(self) -> None:
        self._stop.set()
        self._wake.set()
        for slot in (self._pairs, self._markers):
            slot.stop()
        for worker in (self._worker, self._pairs.thread, self._markers.thread):
            if worker is not None and worker.is_alive():
                worker.join(timeout=5.0)
        super().destroy_node()


class _Msgs:
    """Message classes, imported once (keeps module import light for the CLI)."""

    def __init__(self) -> None:
        from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
        from nav_msgs.msg import Odometry
        from sensor_msgs.msg import PointCloud2
        from std_msgs.msg import Float64
        from visualization_msgs.msg import Marker
        self.DiagnosticArray, self.DiagnosticStatus = DiagnosticArray, DiagnosticStatus
        self.KeyValue = KeyValue
        self.Odometry, self.PointCloud2, self.Float64, self.Marker = Odometry, PointCloud2, Float64, Marker


_MSGS: _Msgs | None = None


def _msgs() -> _Msgs:
    global _MSGS
    if _MSGS is None:
        _MSGS = _Msgs()
    return _MSGS


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------

def spin_node(ros_args: list[str]) -> int:
    """rclpy.init with ``ros_args`` (argv style, without program name), spin until shutdown."""
    rclpy.init(args=[NODE_NAME] + list(ros_args))
    node = None
    try:
        node = ZeroFlowNode()
        # Callbacks only store messages (the worker thread does the work): one thread is enough.
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except (ValueError, ParameterException) as exc:
        # PipelineError / BackendError / ManifestError (model, values) or rclpy's type/range checks
        logging.getLogger(NODE_NAME).error('zeroflow_node cannot start: %s', exc)
        return 1
    finally:
        if node is not None:
            node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--params-file', default=None,
                        help='ROS parameter YAML (default: the declared defaults, '
                        'the same as config/zeroflow.param.yaml)')
    parser.epilog = ('ROS arguments pass through unchanged after --ros-args, e.g. '
                     'zeroflow node --ros-args -r __node:=lidar_flow -r ~/input/pointcloud:=/lidar/points '
                     '-p backend:=onnxruntime')


def run(args: argparse.Namespace) -> int:
    ros_args = list(getattr(args, 'ros_args', []) or [])
    if args.params_file:
        if not os.path.isfile(args.params_file):
            raise SystemExit(f'zeroflow node: --params-file {args.params_file}: no such file')
        ros_args = ['--ros-args', '--params-file', args.params_file, '--'] + ros_args
    return spin_node(ros_args)


def main(argv: list[str] | None = None) -> int:
    """Console script ``zeroflow_node`` (what ``ros2 run`` / the launch file start)."""
    import sys
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    argv = list(sys.argv[1:] if argv is None else argv)
    return spin_node(argv)


if __name__ == '__main__':
    raise SystemExit(main())
