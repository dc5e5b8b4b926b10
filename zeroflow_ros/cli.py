"""The `zeroflow` command.

Sub-commands live in their own modules and are imported only when used, so `zeroflow --help`
and light commands start fast and never pull torch or rclpy they do not need. Each module
provides ``add_arguments(parser)`` and ``run(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    'demo': ('zeroflow_ros.demo', 'bundled real lidar -> live node over DDS -> flow, latency, pictures'),
    'node': ('zeroflow_ros.node', 'run the ROS 2 node (ROS arguments pass through after --ros-args)'),
    'data': ('zeroflow_ros.data.cli', 'datasets: synthetic, import of drives, bag conversion, info'),
    'predict': ('zeroflow_ros.eval.predict', 'write per-sweep flow in the official AV2 layout'),
    'eval': ('zeroflow_ros.eval.evaluate', 'AV2 scene-flow metrics (threeway EPE, bucketed normalised EPE)'),
    'label': ('zeroflow_training.label', 'pseudo-label pairs (default: rigid teacher; parallel, resumable)'),
    'train': ('zeroflow_training.train', 'train the FastFlow3D student on pseudo-labels'),
    'export': ('zeroflow_training.export', 'export a checkpoint to ONNX / a TensorRT engine'),
    'replay': ('zeroflow_ros.replay', 'replay a rosbag2 through the node and record its outputs'),
    'render': ('zeroflow_ros.render', 'bird\'s-eye-view flow pictures from a bag or a predictions folder'),
    'bench': ('zeroflow_ros.bench', 'latency per backend and point count'),
}


def _load(name: str):
    module_name = COMMANDS[name][0]
    return importlib.import_module(module_name)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='zeroflow', description='ZeroFlow lidar scene flow: runtime, ROS 2 node and training.')
    parser.add_argument('-v', '--verbose', action='store_true', help='debug logging')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == only:
            _load(name).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Import only the chosen command: find the first non-option word.
    chosen = next((a for a in argv if not a.startswith('-')), None)
    if chosen not in COMMANDS:
        chosen = None
    parser = build_parser(chosen)
    if chosen == 'node':
        # ROS arguments must reach rclpy unchanged.
        args, rest = parser.parse_known_args(argv)
        args.ros_args = rest
    else:
        args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format='%(levelname)s %(name)s: %(message)s')
    if args.command is None:
        parser.print_help()
        return 2
    return int(_load(args.command).run(args) or 0)


if __name__ == '__main__':
    sys.exit(main())
