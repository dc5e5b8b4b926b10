"""Teachers that pseudo-label pairs: NSFP, the rigid-object teacher and their hybrid (issue #13).

One entry point and one config for every user (``zeroflow label --teacher``, ``zeroflow predict
--method teacher|nsfp``, the bench): :class:`TeacherConfig` names the teacher and carries the settings
of each part; :func:`run_teacher` runs it on a prepared pair (``pc0`` sweep t in ego0, ``pc1`` sweep
t+1 brought into ego0, both ground-removed and range-cropped) and returns residual flow (N,3) float32
and an info dict with ``status``/``reason``/``seconds``. ``DEFAULT_TEACHER`` is the one that measured
best (``bench/bench_teacher.py``, table in ``training/teacher/README.md``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from zeroflow_training.teacher.rigid import RigidConfig

TEACHERS = ('nsfp', 'rigid', 'hybrid')
# rigid: 3-way 0.038 / FG-dynamic 0.11 m at ~1 CPU-s per 30k-point pair on our synthetic val split,
# where fast NSFP scores 0.07 / 0.3 m at ~44 CPU-s (README table).
DEFAULT_TEACHER = 'rigid'


class TeacherError(ValueError):
    """Unknown teacher or bad teacher settings (names what was expected)."""


def _nsfp_config(d: Mapping[str, Any] | None):
    from zeroflow_training.teacher.nsfp import NSFPConfig
    d = dict(d or {})
    if 'betas' in d:
        d['betas'] = tuple(d['betas'])
    return NSFPConfig(**d)


@dataclass
class TeacherConfig:
    """Which teacher and the settings of its parts (the NSFP part is built lazily: it imports torch)."""

    name: str = DEFAULT_TEACHER
    rigid: RigidConfig = field(default_factory=RigidConfig)
    nsfp: Any = None              # NSFPConfig; None = its defaults (hybrid's own defaults for hybrid)
    hybrid: Any = None            # HybridConfig; None = its defaults

    def __post_init__(self) -> None:
        if self.name not in TEACHERS:
            raise TeacherError(f'teacher {self.name!r} unknown; valid: {TEACHERS}')
        if self.hybrid is None:
            from zeroflow_training.teacher.hybrid import HybridConfig
            self.hybrid = HybridConfig()
        if self.nsfp is None and self.name != 'rigid':
            self.nsfp = (self.hybrid.nsfp_config() if self.name == 'hybrid' else _nsfp_config(None))

    @property
    def min_points(self) -> int:
        """Fewer scored points than this in either cloud: the pair is not labelled (as NSFP's rule)."""
        return int(self.nsfp.min_points) if self.nsfp is not None else 16

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict
        return {'teacher': self.name, 'rigid': self.rigid.to_dict(),
                'nsfp': None if self.nsfp is None else self.nsfp.to_dict(),
                'hybrid': asdict(self.hybrid)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> 'TeacherConfig':
        from zeroflow_training.teacher.hybrid import HybridConfig
        d = dict(d)
        extra = sorted(set(d) - {'teacher', 'rigid', 'nsfp', 'hybrid'})
        if extra:
            raise TeacherError(f'TeacherConfig: unknown keys {extra}; valid: teacher, rigid, nsfp, hybrid')
        return cls(name=d.get('teacher', DEFAULT_TEACHER), rigid=RigidConfig.from_dict(d.get('rigid')),
                   nsfp=None if d.get('nsfp') is None else _nsfp_config(d['nsfp']),
                   hybrid=HybridConfig(**(d.get('hybrid') or {})))


def run_teacher(pc0: np.ndarray, pc1: np.ndarray, cfg: TeacherConfig | None = None, device: str = 'cpu',
                seed: int | None = None, dt: float | None = None,
                ego1_T_ego0: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Residual flow (N,3) float32 of ``pc0`` and an info dict (``teacher``, ``status``, ``seconds``, ...).

    ``dt`` is the sweep interval in seconds (the rigid part's speed limits scale with it);
    ``ego1_T_ego0`` the pair's ego motion (the rigid part doubts objects that merely follow the sensor).
    """
    cfg = cfg or TeacherConfig()
    if cfg.name == 'nsfp':
        from zeroflow_training.teacher.nsfp import run_nsfp
        flow, info = run_nsfp(pc0, pc1, cfg.nsfp, device, seed)
    elif cfg.name == 'rigid':
        from zeroflow_training.teacher.rigid import run_rigid
        flow, info = run_rigid(pc0, pc1, cfg.rigid, dt, seed, ego1_T_ego0)
    else:
        from zeroflow_training.teacher.hybrid import run_hybrid
        flow, info = run_hybrid(pc0, pc1, cfg, device, seed, dt, ego1_T_ego0)
    info = dict(info)
    info['teacher'] = cfg.name
    return flow, info
