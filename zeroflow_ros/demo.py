"""``zeroflow demo``: real lidar -> rosbag2 -> the live node over DDS -> flow, latency, pictures.

::

    zeroflow demo [--sequence kitti|synthetic] [--out DIR] [--rate R] [--sweeps N] [--model M]

* ``kitti`` (default): the 10 bundled KITTI raw sweeps (``data/samples/kitti_raw_sfnd_seq``, real
  city traffic, CC BY-NC-SA 3.0, no poses: the node estimates ego motion with its lidar odometry).
* ``synthetic``: a short simulated sequence with exact poses and ground-truth flow, so the demo
  also reports the end-point error.

Steps: the sequence is written to ``DIR/input`` (mcap), ``zeroflow replay`` starts ``zeroflow node``
with the shipped model (``models/default``; if it is missing, an untrained model is built and the
output says so loudly), publishes the sweeps at 10 Hz x ``--rate`` with ``/clock`` (default 1.0:
real time, the sensor rate, on a CPU too; rate 0 sends every sweep as fast as the node takes it),
records the node's outputs to ``DIR/flow`` (mcap) and renders ``DIR/bev/*.png`` and ``DIR/bev/flow.gif``.
Each flow prints one line (latency), the end one summary line.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

log = logging.getLogger(__name__)

KITTI_REL = Path('data') / 'samples' / 'kitti_raw_sfnd_seq' / 'velodyne_points' / 'data'
# KITTI's Velodyne sits 1.73 m above the road (KITTI setup page); the node lifts the clouds into the
# ground-level base frame the model was trained in. Simulated sweeps are in that frame already.
KITTI_NODE_PARAMS = ['sensor_in_base_xyz:=[0.0, 0.0, 1.73]']
SEQUENCES = ('kitti', 'synthetic')


class DemoError(ValueError):
    """The demo cannot run as asked (missing sample data, model, output folder in the way)."""


@dataclass
class DemoResult:
    sequence: str
    sweeps_in: int
    flows_out: int
    expected: int
    dropped: int
    frame_timeouts: int
    latency_p50_ms: float
    latency_p99_ms: float
    backend: str
    device: str
    model: str
    model_trained: bool
    epe_m: float | None = None
    epe_dynamic_m: float | None = None
    input_bag: Path | None = None
    output_bag: Path | None = None
    pngs: list[Path] = field(default_factory=list)
    gif: Path | None = None
    recorded: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        epe = ''
        if self.epe_m is not None:
            epe = f', EPE {self.epe_m:.3f} m (dynamic {self.epe_dynamic_m:.3f} m)' \
                if self.epe_dynamic_m is not None else f', EPE {self.epe_m:.3f} m'
        model = self.model + ('' if self.model_trained else ' [UNTRAINED]')
        return (f'demo {self.sequence}: sweeps in {self.sweeps_in}, '
                f'flows out {self.flows_out}/{self.expected}, dropped {self.dropped}, '
                f'latency p50 {self.latency_p50_ms:.1f} ms p99 {self.latency_p99_ms:.1f} ms, '
                f'backend {self.backend}/{self.device}, model {model}{epe}')


def _source_roots() -> list[Path]:
    roots = [Path.cwd(), Path(__file__).resolve().parent.parent]
    try:
        from ament_index_python.packages import get_package_share_directory
        roots.append(Path(get_package_share_directory('zeroflow_ros')))
    except Exception:  # no ament index (pip install): the source tree is enough
        pass
    roots.append(Path(sys.prefix) / 'share' / 'zeroflow_ros')
    return roots


def find_kitti_sequence() -> Path:
    for r in _source_roots():
        if (r / KITTI_REL).is_dir():
            return r / KITTI_REL
    raise DemoError(f'bundled KITTI sweeps not found ({KITTI_REL} under '
                    + ', '.join(str(r) for r in _source_roots()) + '); run from the source tree')


def find_model(model: str | None, out: Path) -> tuple[str, bool]:
    """(model path, trained?): the given one, else models/default, else an untrained cpu_small model."""
    from zeroflow_ros.pipeline import PipelineError, resolve_model_path
    if model:
        return str(Path(model).resolve()) if Path(model).exists() else model, True
    try:
        return resolve_model_path('models/default'), True
    except PipelineError:
        pass
    import torch

    from zeroflow_ros.model import build_model, get_config, save_checkpoint
    path = out / 'untrained_model' / 'model.pt'
    if not path.is_file():
        torch.manual_seed(0)
        save_checkpoint(path, build_model(get_config('cpu_small')))
    log.warning('models/default not found: using an UNTRAINED cpu_small FastFlow3D (%s). The flow '
                'is meaningless; the pipeline, DDS, latency and pictures are real.', path)
    return str(path), False


def _make_input(sequence: str, out: Path, sweeps: int, beams: int,
                azimuths: int) -> tuple[Path, str | None, Path | None]:
    """Write the sequence as a bag; returns (bag, odometry topic or None, GT data root or None)."""
    from zeroflow_ros.data.bag import records_from_av2_log, records_from_sweeps, write_bag
    bag = out / 'input'
    if sequence == 'kitti':
        folder = find_kitti_sequence()
        # Stamps from 1 s: ROS reads a zero stamp as unset.
        records = list(records_from_sweeps(folder, start_ns=1_000_000_000))[:sweeps]
        write_bag(bag, records, topic='/lidar', frame_id='velodyne', storage='mcap')
        return bag, None, None
    from zeroflow_ros.data.av2 import list_logs
    try:
        from zeroflow_training.data.synth import make_tiny_dataset
    except ImportError as exc:
        raise DemoError(f'--sequence synthetic needs the training package (zeroflow_training): '
                        f'{exc}') from None
    root = make_tiny_dataset(out / 'synthetic', logs=1, sweeps=sweeps, beams=beams, azimuths=azimuths)
    log_dir = list_logs(root, 'val')[0].log_dir
    write_bag(bag, records_from_av2_log(log_dir), topic='/lidar', odom_topic='/odom', frame_id='lidar',
              storage='mcap')
    return bag, '/odom', root


def flow_epe(flow_bag: Path, gt_root: Path) -> tuple[float | None, float | None]:
    """Return the mean end-point error (m) of recorded flow vs ground truth: all, dynamic.

    Over valid non-ground points, and over the ground-truth dynamic ones. Residual flow: its EPE
    equals the AV2-convention EPE (a rigid transform keeps distances).
    """
    from zeroflow_ros.render import iter_bag_frames
    errs, dyn = [], []
    for fr in iter_bag_frames(flow_bag, gt_root=gt_root):
        if fr.gt_flow is None:
            continue
        e = np.linalg.norm(fr.flow.astype(np.float64) - fr.gt_flow.astype(np.float64), axis=1)
        errs.append(e[fr.gt_valid])
        dyn.append(e[fr.gt_valid & fr.gt_dynamic])
    if not errs:
        return None, None
    all_e, dyn_e = np.concatenate(errs), np.concatenate(dyn)
    return (float(all_e.mean()) if len(all_e) else None, float(dyn_e.mean()) if len(dyn_e) else None)


def run_demo(sequence: str = 'kitti', out: Path = Path('demo_out'), rate: float = 1.0, *,
             sweeps: int = 10, model: str | None = None, node_params: list[str] | None = None,
             beams: int = 32, azimuths: int = 1024, gif: bool = True, render_px: int = 800,
             overwrite: bool = True, on_frame: Callable[[Any], None] | None = None) -> DemoResult:
    """Run the whole demo; returns its result (paths, summary figures)."""
    from zeroflow_ros.render import RenderConfig, render
    from zeroflow_ros.replay import ReplayConfig, replay
    if sequence not in SEQUENCES:
        raise DemoError(f'--sequence {sequence!r}: expected one of {SEQUENCES}')
    if sweeps < 2:
        raise DemoError(f'--sweeps {sweeps}: flow needs at least 2 sweeps')
    out = Path(out)
    for sub in ('input', 'flow', 'bev', 'synthetic'):
        if (out / sub).exists():
            if not overwrite:
                raise DemoError(f'{out / sub} exists; remove it or pass another --out')
            shutil.rmtree(out / sub)
    out.mkdir(parents=True, exist_ok=True)
    model_path, trained = find_model(model, out)
    bag, odom, gt_root = _make_input(sequence, out, sweeps, beams, azimuths)
    params = ([f'model:={model_path}'] + (KITTI_NODE_PARAMS if sequence == 'kitti' else [])
              + list(node_params or []))
    cfg = ReplayConfig(bag=bag, topic='/lidar', odom=odom, rate=rate, record=out / 'flow', node_params=params,
                       node_log=out / 'node.log', timeout=120.0, frame_timeout=30.0)
    summary = replay(cfg, on_frame=on_frame)
    res = DemoResult(sequence, summary.sweeps_in, summary.flows_out, summary.expected, summary.dropped,
                     summary.frame_timeouts, summary.latency_p50, summary.latency_p99, summary.backend,
                     summary.device, model_path, trained, input_bag=bag, output_bag=summary.record,
                     recorded=dict(summary.recorded))
    if summary.flows_out:
        # KITTI cars and the truck are within ~30 m; the synthetic scenes are smaller still.
        # City traffic: colour saturates at 5 m/s, arrows show a second of motion (10 sweeps).
        rcfg = RenderConfig(range_m=35.0 if sequence == 'kitti' else 30.0, px=render_px,
                            point_size=1.0 if sequence == 'kitti' else 3.0, max_speed=5.0, arrow_scale=10.0,
                            note='' if trained else 'UNTRAINED MODEL (models/default missing): flow is noise')
        pics = render(summary.record, out / 'bev', rcfg, gt_root=gt_root, gif=gif)
        res.pngs, res.gif = pics['pngs'], pics['gif']
    if gt_root is not None and summary.flows_out:
        res.epe_m, res.epe_dynamic_m = flow_epe(summary.record, gt_root)
    from zeroflow_ros.replay import write_json
    write_json(summary, out / 'replay.json')
    (out / 'summary.txt').write_text(res.line() + '\n')
    return res


def default_rate() -> tuple[float, str]:
    """Real time (the sensor's 10 Hz), with or without a GPU: the node keeps up on a 2-core CPU."""
    return 1.0, 'real time, the sensor rate'


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = __doc__
    parser.add_argument('--sequence', choices=SEQUENCES, default='kitti',
                        help='kitti: 10 real KITTI sweeps (default); synthetic: simulated, with ground truth')
    parser.add_argument('--out', type=Path, default=Path('demo_out'),
                        help='output folder (default ./demo_out)')
    parser.add_argument('--rate', type=float, default=None,
                        help='playback speed: 1.0 = the recorded 10 Hz (default; drops what a slow node '
                             'cannot take, and says so), 0 = every sweep, as fast as the node takes it')
    parser.add_argument('--sweeps', type=int, default=10, help='number of sweeps (default 10)')
    parser.add_argument('--model', default=None, help='model for the node (default models/default)')
    parser.add_argument('--node-param', action='append', default=[], metavar='NAME:=VALUE',
                        help='extra node parameter, e.g. --node-param backend:=onnxruntime')
    parser.add_argument('--no-gif', action='store_true', help='PNGs only')


def run(args: argparse.Namespace) -> int:
    from zeroflow_ros.render import RenderError
    from zeroflow_ros.replay import ReplayError, print_frame
    rate, why = (args.rate, 'as asked') if args.rate is not None else default_rate()
    print(f'zeroflow demo: {args.sequence} sequence -> {args.out} at rate {rate:g} ({why}); node log: '
          f'{args.out}/node.log', flush=True)
    try:
        res = run_demo(args.sequence, args.out, rate, sweeps=args.sweeps, model=args.model,
                       node_params=args.node_param, gif=not args.no_gif, on_frame=print_frame)
    except (DemoError, ReplayError, RenderError) as exc:
        print(f'zeroflow demo: {exc}', file=sys.stderr)
        return 2
    if not res.model_trained:
        print('NOTE: models/default is missing, the node ran an UNTRAINED model: the flow is noise; '
              'latency, DDS and pictures are real.')
    print(f'input bag {res.input_bag}, flow bag {res.output_bag}, {len(res.pngs)} PNGs in {args.out}/bev'
          + (f', GIF {res.gif}' if res.gif else ''))
    if res.dropped:
        print(f'{res.dropped} sweeps dropped: the node is slower than {10 * rate:g} Hz on this machine '
              '(try --rate 0 for every sweep, or a GPU backend)')
    print(res.line())
    return 0 if res.flows_out else 1
