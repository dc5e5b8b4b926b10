"""CPU latency of every installed backend for the paper and cpu_small configs (issue #7).

Thin wrapper over ``zeroflow bench`` (same code: :func:`zeroflow_ros.bench.run_bench`), run once per
config on an untrained export (latency does not depend on the weights), writing one JSON per config::

    python bench/bench_backends.py                       # both configs, 30k/60k/100k points
    python bench/bench_backends.py --configs cpu_small --points 60000 --repeats 20

The figures are wall times on whatever else the machine is doing; the JSON records the load average
before and after, so a figure taken on a busy box can be recognised as such.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from zeroflow_ros.bench import format_table, parse_runs, prepare_model, run_bench  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--configs', default='cpu_small,paper')
    ap.add_argument('--backends', default='onnxruntime,torch')
    ap.add_argument('--points', default='30000,60000,100000')
    ap.add_argument('--repeats', type=int, default=10)
    ap.add_argument('--warmup', type=int, default=2)
    ap.add_argument('--threads', type=int, default=None, help='default: all cores')
    ap.add_argument('--device', default='cpu', choices=('cpu', 'cuda', 'auto'))
    ap.add_argument('--json-dir', default=str(ROOT / 'bench' / 'results'))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    points = [int(v) for v in args.points.split(',')]
    runs = parse_runs(args.backends.split(','), ['fp32'])
    out_dir = Path(args.json_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix='zf_bench_') as tmp:
        for config in args.configs.split(','):
            model = prepare_model(config, tmp)
            load_before = [round(v, 2) for v in os.getloadavg()]
            rep = run_bench(model, runs, points, args.device, args.repeats, args.warmup, args.threads)
            rep['config'] = config
            rep['machine']['loadavg_before'] = load_before
            rep['machine']['loadavg_after'] = [round(v, 2) for v in os.getloadavg()]
            print(f'\n[{config}, {args.device}, threads={rep["threads"]}, load {load_before} -> '
                  f'{rep["machine"]["loadavg_after"]}]')
            print(format_table(rep))
            path = out_dir / f'{args.device}_{config}.json'
            path.write_text(json.dumps(rep, indent=1))
            print(f'wrote {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
