"""Hybrid teacher: rigid motion where an object was accepted, NSFP on small non-rigid leftovers.

The rigid teacher (:mod:`zeroflow_training.teacher.rigid`) leaves static every cluster it could not
register as one rigid body. Some of those do move without being rigid (pedestrians swinging their
limbs, cyclists). The hybrid runs fast NSFP only on the points of registered-but-static clusters no
longer than ``max_extent_m`` (pedestrian/cyclist sized), against the points of sweep t+1 within
``reach_m`` of them, then cleans that NSFP flow as :func:`zeroflow_training.refine.refine_labels`
does (per bird's-eye cluster: the median flow if it is at least 0.5 m/s, else zero). Everything
else is static. Restricting NSFP to the leftovers keeps its cost near its fixed start-up instead of
~44 CPU-s per full pair.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from zeroflow_training.teacher import TeacherConfig


@dataclass
class HybridConfig:
    max_extent_m: float = 3.0     # leftovers larger than this stay static (rigid things the ICP refused)
    reach_m: float = 1.0          # points of t+1 within this of a leftover are NSFP's target
    fit_points: int = 2048        # NSFP subsample (leftovers are small)
    max_iters: int = 150

    def nsfp_config(self):
        from zeroflow_training.teacher.nsfp import NSFPConfig
        return NSFPConfig(fit_points=self.fit_points, fast_max_iters=self.max_iters)


def run_hybrid(pc0: np.ndarray, pc1: np.ndarray, cfg: 'TeacherConfig', device: str = 'cpu',
               seed: int | None = None, dt: float | None = None,
               ego1_T_ego0: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Residual flow (N,3) float32 of ``pc0`` and an info dict (rigid counts + ``nsfp_points``)."""
    from scipy.spatial import cKDTree

    from zeroflow_training.refine import RefineConfig, refine_labels
    from zeroflow_training.teacher.nsfp import run_nsfp
    from zeroflow_training.teacher.rigid import _extent_xy, _groups, rigid_objects

    t0 = time.perf_counter()
    res = rigid_objects(pc0, pc1, cfg.rigid, dt, seed, ego1_T_ego0)
    flow = res.flow.copy()
    info = dict(res.info)
    p0 = np.asarray(pc0, dtype=np.float32)
    p1 = np.asarray(pc1, dtype=np.float32)
    left = np.zeros(len(p0), dtype=bool)
    for idx in _groups(res.cluster):
        small = _extent_xy(p0[idx]) <= cfg.hybrid.max_extent_m
        if res.candidate[idx[0]] and not res.moving[idx[0]] and small:
            left[idx] = True
    info['nsfp_points'] = int(left.sum())
    info['nsfp_seconds'] = 0.0
    if left.sum() >= cfg.nsfp.min_points and len(p1):
        d, _ = cKDTree(p0[left]).query(p1, k=1, distance_upper_bound=cfg.hybrid.reach_m)
        target = p1[np.isfinite(d)]
        if len(target) >= cfg.nsfp.min_points:
            nflow, ninfo = run_nsfp(p0[left], target, cfg.nsfp, device, seed)
            info['nsfp_seconds'] = float(ninfo.get('seconds', 0.0))
            if ninfo.get('status') == 'ok':
                rcfg = RefineConfig(max_extent_m=cfg.hybrid.max_extent_m,
                                    frame_rate_hz=1.0 / (dt or cfg.rigid.frame_dt_s))
                flow[left] = refine_labels(p0[left], nflow, np.ones(int(left.sum()), bool), rcfg)
    info['seconds'] = time.perf_counter() - t0
    return flow, info
