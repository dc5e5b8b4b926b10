"""All linters in one place (ament_flake8 / ament_pep257 equivalents that run without a ROS install)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ['zeroflow_ros', 'training', 'launch', 'test', 'bench', 'setup.py']
# pep257 convention minus the missing-docstring codes, as ament_pep257 runs it by default.
PEP257_IGNORE = 'D100,D101,D102,D103,D104,D105,D106,D107'


def _run(args):
    return subprocess.run([sys.executable, '-m'] + args, cwd=ROOT, capture_output=True, text=True)


def test_flake8():
    pytest.importorskip('flake8')
    res = _run(['flake8'] + TARGETS)
    assert res.returncode == 0, 'flake8 found problems:\n' + res.stdout + res.stderr


def test_pep257():
    pytest.importorskip('pydocstyle')
    res = _run(['pydocstyle', '--convention=pep257', '--add-ignore=' + PEP257_IGNORE,
                'zeroflow_ros', 'training'])
    assert res.returncode == 0, 'pydocstyle found problems:\n' + res.stdout + res.stderr
