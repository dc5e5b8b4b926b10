"""Markdown results table (method x metric) from `zeroflow eval` metrics.json files.

    python bench/results_table.py zero=/path/zero_eval ego=/path/ego_eval nn=/path/nn_eval ...
"""
import json
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


def main(argv: list[str]) -> int:
    print('| method | ' + ' | '.join(c for c, _ in COLUMNS) + ' |')
    print('|---' * (len(COLUMNS) + 1) + '|')
    for arg in argv:
        name, path = arg.split('=', 1)
        metrics = json.loads((Path(path) / 'metrics.json').read_text())
        cells = [f'{float(metrics[a][b]):.4f}' for _, (a, b) in COLUMNS]
        print(f'| {name} | ' + ' | '.join(cells) + ' |')
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
