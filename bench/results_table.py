"""Markdown results table (method x metric) from `zeroflow eval` metrics.json files.

Usage::

    python bench/results_table.py zero=/path/zero_eval ego=/path/ego_eval nn=/path/nn_eval ...
    python bench/results_table.py --speed-buckets teacher=/path/teacher_eval ...

``--speed-buckets`` adds one column per ground-truth speed bucket (Foreground/Dynamic EPE, with its
point count in brackets); off by default because it doubles the width of the README table.
"""
import argparse
import json
import math
import sys
from pathlib import Path

COLUMNS = [
    ('EPE 3-way', ('threeway', 'EPE 3-Way Average')),
    ('FG dynamic', ('threeway', 'EPE/Foreground/Dynamic')),
    ('FG static', ('threeway', 'EPE/Foreground/Static')),
    ('BG static', ('threeway', 'EPE/Background/Static')),
    ('Dynamic IoU', ('threeway', 'Dynamic IoU')),
    ('bucketed static EPE', ('bucketed', 'mean_static_epe')),
    ('bucketed dyn. norm. EPE', ('bucketed', 'mean_dynamic_normalized_epe')),
]
SPEED_KEY = 'fg_dynamic_by_speed'


def _fmt(v) -> str:
    # metrics.json writes NaN (an empty subset) as null.
    return '-' if v is None or not math.isfinite(float(v)) else f'{float(v):.4f}'


def _speed_cells(metrics: dict, where: Path) -> tuple[list[str], list[str]]:
    """(headers, cells) of the per-speed-bucket columns of one metrics.json."""
    if SPEED_KEY not in metrics:
        raise SystemExit(f'{where}: no {SPEED_KEY!r} (written by an older `zeroflow eval`); rerun the eval')
    buckets = metrics[SPEED_KEY]['buckets']
    heads = [f'FG dyn {b["bucket_mps"]} m/s (n)' for b in buckets]
    return heads, [f'{_fmt(b["epe"])} ({b["count"]})' for b in buckets]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('runs', nargs='+', metavar='NAME=EVAL_DIR', help='a method name and its eval folder')
    parser.add_argument('--speed-buckets', action='store_true',
                        help='add Foreground/Dynamic EPE per ground-truth speed bucket (wide)')
    args = parser.parse_args(argv)
    header, rows = None, []
    for arg in args.runs:
        name, sep, path = arg.partition('=')
        if not sep:
            parser.error(f'expected NAME=EVAL_DIR, got {arg!r}')
        where = Path(path) / 'metrics.json'
        metrics = json.loads(where.read_text())
        heads = [c for c, _ in COLUMNS]
        cells = [_fmt(metrics[a][b]) for _, (a, b) in COLUMNS]
        if args.speed_buckets:
            extra_heads, extra = _speed_cells(metrics, where)
            heads, cells = heads + extra_heads, cells + extra
        if header is not None and heads != header:
            raise SystemExit(f'{where}: speed buckets {heads[len(COLUMNS):]} differ from the first run\'s')
        header = heads
        rows.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    print('| method | ' + ' | '.join(header) + ' |')
    print('|---' * (len(header) + 1) + '|')
    print('\n'.join(rows))
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
