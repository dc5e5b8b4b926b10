"""``zeroflow data``: synthetic sequences, conversion to rosbag2, inspection.

::

    zeroflow data synth OUT --sequences 20 --sweeps 20            # engineer tooling in zeroflow_training
    zeroflow data to-bag SOURCE OUT.mcap [--topic /lidar] [--odom-topic /odom] [--frame-id lidar]
    zeroflow data info PATH                                       # a bag, an AV2 root/log or a sweep folder
    zeroflow data import SOURCE OUT [--split train] [--log-id ID] [--poses FILE] [--odom-topic T] [--topic T]
                         [--sensor-xyz X Y Z] [--sensor-rpy R P Y] [--poses-frame {sensor,base}]

``to-bag`` SOURCE is an AV2/synthetic log folder (or a root holding exactly one log, else pick it
with ``--log-id``), or a folder of KITTI ``.bin`` / PCD sweeps (``--poses`` adds odometry from a
KITTI-style pose file). ``OUT.mcap`` writes an mcap bag in the folder ``OUT/``; ``OUT.db3`` a
sqlite3 one; without an extension ``--storage`` decides (default mcap).
"""
from __future__ import annotations

import argparse
import itertools
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest='data_command', metavar='ACTION')
    p = sub.add_parser('synth', help='write synthetic AV2-layout logs with exact scene-flow ground truth')
    try:
        from zeroflow_training.data.cli_synth import add_synth_arguments
    except ImportError as exc:
        p.set_defaults(synth_missing=str(exc))
        p.add_argument('rest', nargs=argparse.REMAINDER)
    else:
        add_synth_arguments(p)

    p = sub.add_parser('to-bag', help='convert an AV2/synthetic log or a KITTI/PCD sweep folder to a rosbag2',
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('source', type=Path, metavar='SOURCE', help='AV2/synthetic log (or root) or sweep folder')
    p.add_argument('out', type=Path, metavar='OUT', help='OUT.mcap, OUT.db3, or a bag folder (see --storage)')
    p.add_argument('--topic', default='/lidar', help='PointCloud2 topic (default /lidar)')
    p.add_argument('--odom-topic', default='/odom',
                   help='nav_msgs/Odometry topic written when poses are known (default /odom)')
    p.add_argument('--no-odom', action='store_true', help='do not write odometry even when poses are known')
    p.add_argument('--tf-topic', default='/tf',
                   help='also write the poses as odom-frame -> frame-id transforms here (default /tf; '
                        '"" to skip)')
    p.add_argument('--frame-id', default='lidar',
                   help='cloud frame_id, also the odometry child frame (default lidar)')
    p.add_argument('--odom-frame', default='odom', help='odometry header frame_id (default odom)')
    p.add_argument('--poses', type=Path, default=None,
                   help='KITTI-style pose file for a sweep folder ([name] + 12 numbers per line)')
    p.add_argument('--storage', choices=('mcap', 'sqlite3'), default=None,
                   help='storage plugin when OUT has no .mcap/.db3 extension (default mcap)')
    p.add_argument('--log-id', default=None, help='which log of an AV2 root to convert')
    p.add_argument('--split', default=None, help='split folder of an AV2 root (e.g. val)')
    p.add_argument('--max-sweeps', type=int, default=None, help='convert only the first N sweeps')
    p.add_argument('--start-ns', type=int, default=1_000_000_000,
                   help='first stamp for sweep folders without recorded times, then nominal 10 Hz '
                        '(default 1 s: ROS reads a zero stamp as unset)')

    p = sub.add_parser('info', help='summarise a bag, an AV2 root/log or a sweep folder')
    p.add_argument('path', type=Path, metavar='PATH')
    _add_import_arguments(sub)


def _add_import_arguments(sub) -> None:
    from zeroflow_ros.data import importer
    p = sub.add_parser('import', help='turn a rosbag2, a KITTI/PCD sweep folder or an Ouster pcap into an '
                       'AV2-layout log (for zeroflow label/train)',
                       description=importer.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('source', type=Path, metavar='SOURCE',
                   help='rosbag2 (folder, .mcap, .db3), folder of .bin/.pcd sweeps, or .pcap (+ --meta)')
    p.add_argument('out', type=Path, metavar='OUT',
                   help='dataset root; the log goes to OUT/<split>/<log_id>/')
    p.add_argument('--split', default='train', help='split folder (default train)')
    p.add_argument('--log-id', default=None, help='log folder name (default: the source name)')
    p.add_argument('--poses', type=Path, default=None,
                   help='TUM file (t tx ty tz qx qy qz qw, interpolated at the sweep times) or KITTI-style '
                        'file (by name for sweep folders, else one line per sweep)')
    p.add_argument('--topic', default=None, help='PointCloud2 topic (default: the bag\'s only one)')
    p.add_argument('--odom-topic', default=None,
                   help='nav_msgs/Odometry topic (default: the bag\'s only one; "" = KISS-ICP instead)')
    p.add_argument('--meta', type=Path, default=None,
                   help='Ouster metadata json (default: the only .json beside the pcap)')
    p.add_argument('--no-deskew', action='store_true', help='keep sweeps as measured (offset_ns still kept)')
    p.add_argument('--max-sweeps', type=int, default=None, help='import only the first N sweeps')
    p.add_argument('--start-ns', type=int, default=1_000_000_000,
                   help='first stamp for sweep folders without recorded times, then nominal 10 Hz')
    p.add_argument('--odom-threads', type=int, default=0, help='KISS-ICP threads (0 = all cores)')
    p.add_argument('--overwrite', action='store_true', help='replace an existing log of the same id')
    p.add_argument('--sensor-xyz', type=float, nargs=3, default=(0.0, 0.0, 0.0), metavar=('X', 'Y', 'Z'),
                   help='lidar position in the base frame, m (as the node\'s sensor_in_base_xyz; '
                        'default 0 0 0 = the log\'s ego frame is the lidar\'s)')
    p.add_argument('--sensor-rpy', type=float, nargs=3, default=(0.0, 0.0, 0.0), metavar=('R', 'P', 'Y'),
                   help='lidar roll, pitch, yaw in the base frame, rad (as the node\'s sensor_in_base_rpy)')
    p.add_argument('--poses-frame', choices=importer.POSE_FRAMES, default=None,
                   help='frame the given poses describe (default: sensor for pose files; for bag odometry '
                        'sensor when its child_frame_id is the cloud frame, else base)')


def _import(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from zeroflow_ros.core.odometry import OdometryConfig
    from zeroflow_ros.data.importer import import_source
    res = import_source(args.source, args.out, split=args.split, log_id=args.log_id, poses=args.poses,
                        topic=args.topic, odom_topic=args.odom_topic, meta=args.meta,
                        deskew_sweeps=not args.no_deskew, max_sweeps=args.max_sweeps,
                        start_ns=args.start_ns, overwrite=args.overwrite, sensor_xyz=tuple(args.sensor_xyz),
                        sensor_rpy=tuple(args.sensor_rpy), poses_frame=args.poses_frame,
                        odometry=OdometryConfig(max_num_threads=args.odom_threads),
                        progress=lambda it: tqdm(it, desc='import', unit='sweep'))
    print(f'imported {res.sweeps} sweeps ({res.points} points) to {res.log_dir}; '
          f'poses from {res.pose_source}; {res.deskewed} sweeps de-skewed; {res.skipped} skipped')
    return 0


def _av2_log_dir(source: Path, log_id: str | None, split: str | None) -> Path | None:
    """Return the AV2 log folder SOURCE designates, None when SOURCE is not AV2-like."""
    if (source / 'sensors' / 'lidar').is_dir():
        return source
    from zeroflow_ros.data.av2 import DataError, list_logs
    root = source / split if split else source
    if not root.is_dir():
        raise DataError(f'{root}: not a folder')
    logs = list_logs(root, None)
    if not logs and not split:
        logs = [log for d in sorted(root.iterdir()) if d.is_dir() for log in list_logs(d, None)]
    if not logs:
        return None
    if log_id is not None:
        match = [log.log_dir for log in logs if log.log_id == log_id]
        if not match:
            raise DataError(f'{source}: no log {log_id!r} (has {[log.log_id for log in logs]})')
        return match[0]
    if len(logs) > 1:
        raise DataError(f'{source}: holds {len(logs)} logs; pick one with --log-id '
                        f'({", ".join(log.log_id for log in logs[:5])}{", ..." if len(logs) > 5 else ""})')
    return logs[0].log_dir


def _to_bag(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from zeroflow_ros.data.av2 import DataError
    from zeroflow_ros.data.bag import records_from_av2_log, records_from_sweeps, write_bag
    source = Path(args.source)
    log_dir = _av2_log_dir(source, args.log_id, args.split)
    if log_dir is not None:
        if args.poses:
            logger.warning('--poses ignored: AV2 logs carry their own poses')
        records = records_from_av2_log(log_dir)
        kind = f'AV2 log {log_dir.name}'
    else:
        records = records_from_sweeps(source, args.poses, args.start_ns)
        kind = f'sweep folder {source}'
    if args.max_sweeps is not None:
        if args.max_sweeps < 1:
            raise DataError(f'--max-sweeps: expected >= 1, got {args.max_sweeps}')
        records = itertools.islice(records, args.max_sweeps)
    odom = None if args.no_odom else args.odom_topic
    bag_dir, n = write_bag(args.out, tqdm(records, desc='to-bag', unit='sweep'), topic=args.topic,
                           odom_topic=odom, frame_id=args.frame_id, odom_frame=args.odom_frame,
                           storage=args.storage, tf_topic=None if args.no_odom else (args.tf_topic or None))
    print(f'wrote {n} sweeps of {kind} to {bag_dir}')
    _print_bag(bag_dir)
    return 0


def _print_bag(path: Path) -> None:
    from zeroflow_ros.data.bag import bag_info
    info = bag_info(path)
    dur = (info.end_ns - info.start_ns) / 1e9
    print(f'bag {info.path} ({info.storage}): {info.message_count} messages, {dur:.2f} s, '
          f'start {info.start_ns} ns')
    for t in info.topics.values():
        print(f'  {t.name:30s} {t.msgtype:32s} {t.count:6d} msgs')
    from zeroflow_ros.data.bag import POINTCLOUD2, first_cloud_layout
    for t in info.topics.values():
        if t.msgtype == POINTCLOUD2 and t.count:
            print(f'  {t.name}: {first_cloud_layout(path, t.name)}')


def _find_logs(path: Path) -> list:
    """Return the AV2 logs at PATH: the log itself, the logs of a split folder, or of every split."""
    from zeroflow_ros.data.av2 import AV2Log, list_logs
    if (path / 'sensors' / 'lidar').is_dir():
        return [AV2Log(path)]
    logs = list_logs(path, None)
    return logs or [log for d in sorted(path.iterdir()) if d.is_dir() for log in list_logs(d, None)]


def _info(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if (path.is_file() and path.suffix in ('.mcap', '.db3')) or (path / 'metadata.yaml').is_file():
        _print_bag(path)
        return 0
    if not path.is_dir():
        print(f'{path}: neither a bag nor a folder')
        return 2
    logs = _find_logs(path)
    for log in logs:
        ts = log.timestamps
        has = [name for name, ok in (
            ('poses', (log.log_dir / 'city_SE3_egovehicle.feather').exists()),
            ('annotations', (log.log_dir / 'annotations.feather').exists()),
            ('map', log.ground_raster is not None),
            ('scene_flow', (log.log_dir / 'scene_flow').is_dir())) if ok]
        span = (ts[-1] - ts[0]) / 1e9 if len(ts) > 1 else 0.0
        n0 = len(log.points(int(ts[0]))) if len(ts) else 0
        print(f'{log.log_dir}: {len(ts)} sweeps over {span:.2f} s, first sweep {n0} points, '
              f'has {", ".join(has) or "nothing else"}')
    if logs:
        return 0
    from zeroflow_ros.data.sweeps import list_sweep_files, read_sweep
    files = list_sweep_files(path)
    first = read_sweep(files[0])
    print(f'{path}: {len(files)} {files[0].suffix} sweeps, first has {len(first.points)} points, '
          f'fields {["x", "y", "z"] + list(first.fields)}')
    return 0


def run(args: argparse.Namespace) -> int:
    cmd = getattr(args, 'data_command', None)
    if cmd == 'synth':
        if getattr(args, 'synth_missing', None):
            print(f'zeroflow data synth needs the training package (zeroflow_training): {args.synth_missing}')
            return 2
        from zeroflow_training.data.cli_synth import run_synth
        return int(run_synth(args) or 0)
    if cmd in ('to-bag', 'info', 'import'):
        from zeroflow_ros.data.av2 import DataError
        try:
            return {'to-bag': _to_bag, 'info': _info, 'import': _import}[cmd](args)
        except DataError as exc:
            # Bad input is the user's to fix: one clear line, no traceback.
            print(f'zeroflow data {cmd}: error: {exc}', file=sys.stderr)
            return 2
    print('usage: zeroflow data {synth,to-bag,info,import} ... (zeroflow data -h for help)')
    return 2
