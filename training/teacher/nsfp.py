"""Neural Scene Flow Prior (NSFP) teacher: the faithful optimisation and a fast variant.

NSFP (Li, Lin, Lucey, "Neural Scene Flow Prior", NeurIPS 2021) fits, per point-cloud pair, a
coordinate MLP ``f(p) -> flow`` by minimising a truncated Chamfer distance between ``p + f(p)``
and the next cloud, plus a cycle term with a second (backward) MLP. ZeroFlow (Vedder et al.,
arXiv 2305.10424) uses it as the teacher whose outputs are distilled into FastFlow3D.

Faithful constants (``NSFPConfig(fast=False)``), from the reference code
github.com/Lilac-Lee/Neural_Scene_Flow_Prior (``model.py``, ``loss.py``, ``config.py``,
``optimization.py``) as used by ZeroFlow (github.com/kylevedder/zeroflow,
``models/nsfp_baseline/optimize.py``), the code that produced ZeroFlow's pseudo-labels:

* MLP 3 -> 8 x [Linear 128 + ReLU] -> Linear 3 (``Neural_Prior(filter_size=128, layer_size=8)``),
  PyTorch ``nn.Linear`` default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases.
* The backward MLP starts as a copy of the forward one (``copy.deepcopy(net)``).
* loss = chamfer(p + f(p), q) + chamfer(p + f(p) - g(p + f(p)), p), each chamfer the sum of both
  directions' *mean* squared NN distances, where squared distances ``>= 2`` (m^2) count as 0
  (``loss.py``: ``dist_thd = 2`` applied to pytorch3d ``knn_points`` squared dists; the mean still
  divides by all points).
* Adam, lr 0.008, betas (0.9, 0.999), eps 1e-8 (torch defaults), weight decay 0 (ZeroFlow; the
  NSFP repo passes 1e-4 in its parameter groups).
* up to 5000 iterations (``--iters 5000``); early stopping on the total loss with patience 100
  and min_delta 5e-5 (ZeroFlow; NSFP's repo uses 1e-4). A non-finite loss stops at once.
* The returned flow is that of the iterate with the lowest *forward* Chamfer (ZeroFlow keeps
  ``best_forward``), evaluated before that iteration's update.
* A fresh, seeded network per pair (the NSFP repo reuses one network across samples; ZeroFlow
  builds a new one in ``optimize``).

Fast variant (``NSFPConfig(fast=True)``, the default): the same model and loss, made cheaper by
(1) fitting on a random subsample of each cloud (``fit_points``) and then querying the continuous
MLP at every point, (2) an exact NN step that is cheap where the work runs (KD-tree on the CPU,
batched brute force on a GPU, or a FastNSF distance transform), (3) a shorter iteration cap with a
cosine learning-rate decay so the optimisation converges inside it. See ``bench/bench_nsfp.py``.

Both variants run on a *batch* of pairs at once: every pair has its own MLP weights, stacked as
``(K, in, out)`` and applied with ``torch.baddbmm`` (block-diagonal), its own early stopping and its
own Adam state, so pair k's result does not depend on which other pairs share the batch.
:func:`run_nsfp` is the batch of one.

Input convention: ``pc0`` is sweep t in ego0, ``pc1`` sweep t+1 already brought into ego0, both
ground-removed and range-cropped; the flow returned is *residual* flow
(:mod:`zeroflow_ros.core.geometry`).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .nn_search import NN_ENGINES, DistanceGrid, gather_sq_dist, nn_kdtree

log = logging.getLogger(__name__)

NN_CHOICES = ('auto', 'dt', 'kdtree', 'brute')


class NSFPError(ValueError):
    """Bad input or configuration of the NSFP teacher (names the argument and what was expected)."""


@dataclass
class NSFPConfig:
    """Every constant of the optimisation; defaults documented in the module docstring."""

    fast: bool = True
    nn: str = 'auto'               # auto: kdtree on CPU, brute on CUDA (no CPU round trip in the loop)
    hidden_units: int = 128        # NSFP model.py filter_size
    hidden_layers: int = 8         # ZeroFlow Neural_Prior(layer_size=8)
    lr: float = 0.008              # NSFP config.py --lr
    weight_decay: float = 0.0      # ZeroFlow optimize(): 'weight_decay': 0
    betas: tuple[float, float] = (0.9, 0.999)  # torch.optim.Adam defaults
    eps: float = 1e-8
    max_iters: int = 5000          # NSFP config.py --iters
    patience: int = 100            # NSFP config.py --early_patience; ZeroFlow EarlyStopping(patience=100)
    min_delta: float = 5e-5        # ZeroFlow optimize(min_delta=0.00005)
    trunc_sq_dist: float = 2.0     # NSFP loss.py dist_thd = 2 (squared metres)
    min_points: int = 16           # fewer real points than this in either cloud: refuse (NSFPError)
    seed: int = 1234               # NSFP config.py --seed
    # Fast variant only (ignored when fast=False), sized with bench/bench_nsfp.py for the budget of
    # <= 60 s per 60k-point pair on one CPU core: an iteration at 8192 fit points costs ~0.29 CPU-s
    # (the two MLPs' forward+backward are ~85 % of it), so 200 iterations at most; early stopping
    # usually ends sooner. Fewer fit points are cheaper per iteration but sparser: 4096 points
    # needed more iterations for a worse EPE, and 2048 points of an 8.9k-point cloud scored 58 %
    # worse than the faithful fit (mostly static background hallucinated as moving).
    fit_points: int = 8192         # random subsample of each cloud the MLPs are fitted on
    fast_max_iters: int = 200      # iteration cap of the fast variant (the cosine decay spans it)
    fast_patience: int = 50        # early-stopping patience of the fast variant
    fast_lr_final: float = 0.1     # cosine decay of the lr to this fraction at fast_max_iters
    dt_voxel: float = 0.1          # FastNSF distance-transform grid spacing (m), nn='dt' only
    query_chunk: int = 65536       # points per forward pass when querying the fitted MLP

    def __post_init__(self) -> None:
        if self.nn not in NN_CHOICES:
            raise NSFPError(f'NSFPConfig.nn must be one of {NN_CHOICES}, got {self.nn!r}')
        for name in ('hidden_units', 'hidden_layers', 'max_iters', 'fit_points', 'fast_max_iters',
                     'min_points'):
            if int(getattr(self, name)) < 1:
                raise NSFPError(f'NSFPConfig.{name} must be >= 1, got {getattr(self, name)}')
        if not (self.lr > 0 and self.trunc_sq_dist > 0 and 0 < self.fast_lr_final <= 1):
            raise NSFPError(f'NSFPConfig: lr, trunc_sq_dist must be > 0 and fast_lr_final in (0,1], '
                            f'got {self.lr}, {self.trunc_sq_dist}, {self.fast_lr_final}')

    @classmethod
    def faithful(cls, **kw: Any) -> 'NSFPConfig':
        return cls(fast=False, **kw)

    # Effective values: the fast variant overrides a few of the faithful ones.
    @property
    def iters(self) -> int:
        return self.fast_max_iters if self.fast else self.max_iters

    @property
    def eff_patience(self) -> int:
        return self.fast_patience if self.fast else self.patience

    def engine(self, device: str | torch.device) -> str:
        if self.nn != 'auto':
            return self.nn
        return 'brute' if torch.device(device).type != 'cpu' else 'kdtree'

    def lr_at(self, it: int) -> float:
        if not self.fast or self.fast_lr_final >= 1.0:
            return self.lr
        frac = min(1.0, it / max(1, self.fast_max_iters - 1))
        cosine = 0.5 * (1 + math.cos(math.pi * frac))
        return self.lr * (self.fast_lr_final + (1 - self.fast_lr_final) * cosine)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# batched MLP and Adam

def _init_mlp(gen: torch.Generator, units: int, layers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Weights (in, out) and biases (out,) with nn.Linear's default distribution."""
    dims = [3] + [units] * layers + [3]
    out = []
    for i, o in zip(dims[:-1], dims[1:]):
        bound = 1.0 / math.sqrt(i)
        w = (torch.rand((o, i), generator=gen) * 2 - 1) * bound  # drawn as nn.Linear's (out, in)
        b = (torch.rand((o,), generator=gen) * 2 - 1) * bound
        out.append((w.t().contiguous(), b))
    return out


def _stack_params(per_pair: list[list[tuple[torch.Tensor, torch.Tensor]]], device) -> list[torch.Tensor]:
    params = []
    for layer in range(len(per_pair[0])):
        params.append(torch.stack([p[layer][0] for p in per_pair]).to(device).requires_grad_(True))
        bias = torch.stack([p[layer][1] for p in per_pair])[:, None, :]
        params.append(bias.to(device).requires_grad_(True))
    return params


def mlp_forward(params: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """(K, P, 3) -> (K, P, 3): ReLU MLP with per-batch-element weights (block-diagonal bmm)."""
    n = len(params) // 2
    for i in range(n):
        x = torch.baddbmm(params[2 * i + 1], x, params[2 * i])
        if i < n - 1:
            x = torch.relu(x)
    return x


class MaskedAdam:
    """torch.optim.Adam's update (non-amsgrad, L2 weight decay) on stacked per-pair parameters.

    It is applied only to the pairs still optimising: a stopped pair keeps its weights and moments,
    exactly as if it had been optimised alone.
    """

    def __init__(self, params: list[torch.Tensor], lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float) -> None:
        self.params = params
        self.lr, self.betas, self.eps, self.wd = lr, betas, eps, weight_decay
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.step_count = 0

    @torch.no_grad()
    def step(self, active: torch.Tensor, lr: float | None = None) -> None:
        # Every active pair has taken exactly as many steps as the batch (a pair never restarts).
        self.step_count += 1
        lr = self.lr if lr is None else lr
        b1, b2 = self.betas
        bc1 = 1 - b1 ** self.step_count
        bc2_sqrt = math.sqrt(1 - b2 ** self.step_count)
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            mask = active.view(-1, *([1] * (p.ndim - 1)))
            g = p.grad if self.wd == 0 else p.grad.add(p, alpha=self.wd)
            m_new = m.lerp(g, 1 - b1)
            v_new = v.mul(b2).addcmul_(g, g, value=1 - b2)
            p_new = p.addcdiv(m_new, (v_new.sqrt() / bc2_sqrt).add_(self.eps), value=-lr / bc1)
            m.copy_(torch.where(mask, m_new, m))
            v.copy_(torch.where(mask, v_new, v))
            p.copy_(torch.where(mask, p_new, p))

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def select(self, rows: torch.Tensor) -> 'MaskedAdam':
        """Restrict the optimiser to some batch rows (new leaf parameters, sliced moments)."""
        out = MaskedAdam([p.detach()[rows].clone().requires_grad_(True) for p in self.params],
                         self.lr, self.betas, self.eps, self.wd)
        out.m = [m[rows].clone() for m in self.m]
        out.v = [v[rows].clone() for v in self.v]
        out.step_count = self.step_count
        return out


# ----------------------------------------------------------------------------------------------
# loss

def _trunc_mean(d2: torch.Tensor, mask: torch.Tensor, count: torch.Tensor, trunc: float) -> torch.Tensor:
    keep = mask & (d2 < trunc)
    return torch.where(keep, d2, torch.zeros_like(d2)).sum(1) / count


class _FixedTarget:
    """NN of moving queries against a target cloud that stays fixed for the whole optimisation."""

    def __init__(self, engine: str, target: torch.Tensor, tmask: torch.Tensor, cfg: NSFPConfig) -> None:
        self.engine, self.target, self.tmask = engine, target, tmask
        if engine == 'kdtree':
            from scipy.spatial import cKDTree
            t = target.detach().cpu().numpy()
            m = tmask.cpu().numpy()
            self.index = [np.flatnonzero(mk) for mk in m]
            self.trees = [cKDTree(t[k, ix]) for k, ix in enumerate(self.index)]
        elif engine == 'dt':
            t = target.detach().cpu().numpy()
            m = tmask.cpu().numpy()
            self.grid = DistanceGrid([t[k, mk] for k, mk in enumerate(m)], cfg.dt_voxel,
                                     math.sqrt(cfg.trunc_sq_dist) + cfg.dt_voxel, target.device)

    def select(self, rows: torch.Tensor) -> '_FixedTarget':
        """Restrict the targets to some batch rows (CPU index tensor)."""
        out = _FixedTarget.__new__(_FixedTarget)
        out.engine = self.engine
        dev_rows = rows.to(self.target.device)
        out.target, out.tmask = self.target[dev_rows], self.tmask[dev_rows]
        if self.engine == 'kdtree':
            out.index = [self.index[i] for i in rows.tolist()]
            out.trees = [self.trees[i] for i in rows.tolist()]
        elif self.engine == 'dt':
            out.grid = self.grid.select(dev_rows)
        return out

    def sq_dist(self, query: torch.Tensor, qmask: torch.Tensor) -> torch.Tensor:
        if self.engine == 'dt':
            return self.grid.distance(query) ** 2
        if self.engine == 'kdtree':
            q = np.nan_to_num(query.detach().cpu().numpy(), nan=0.0, posinf=0.0, neginf=0.0)
            qm = qmask.cpu().numpy()
            idx = np.zeros(qm.shape, dtype=np.int64)
            for k, tree in enumerate(self.trees):
                sel = np.flatnonzero(qm[k])
                if len(sel):
                    idx[k, sel] = self.index[k][tree.query(q[k, sel], k=1)[1]]
            idx_t = torch.from_numpy(idx).to(query.device)
        else:
            idx_t = NN_ENGINES['brute'](query, qmask, self.target, self.tmask)
        return gather_sq_dist(query, self.target, idx_t)


def _moving_sq_dist(engine: str, query: torch.Tensor, qmask: torch.Tensor, target: torch.Tensor,
                    tmask: torch.Tensor) -> torch.Tensor:
    """NN of fixed queries in a target that moves every iteration (the warped cloud)."""
    fn = nn_kdtree if (engine in ('kdtree', 'dt') and query.device.type == 'cpu') else NN_ENGINES['brute']
    return gather_sq_dist(query, target, fn(query, qmask, target, tmask))


def truncated_chamfer(a: torch.Tensor, amask: torch.Tensor, b: torch.Tensor, bmask: torch.Tensor,
                      engine: str = 'brute', trunc_sq_dist: float = 2.0,
                      dt_voxel: float = 0.1) -> torch.Tensor:
    """Return the (K,) truncated Chamfer distance of the reference ``my_chamfer_fn``.

    Mean over a of the squared distance to the nearest b plus mean over b of that to the nearest
    a, squared distances ``>= trunc`` counting 0. ``a`` is the moving side (its NN in b goes
    through ``engine``; for b's NN in a, dt falls back to an exact search).
    """
    cfg = NSFPConfig(nn=engine, trunc_sq_dist=trunc_sq_dist, dt_voxel=dt_voxel)
    na = amask.sum(1).to(a.dtype)
    nb = bmask.sum(1).to(b.dtype)
    fixed = _FixedTarget(engine, b, bmask, cfg)
    return (_trunc_mean(fixed.sq_dist(a, amask), amask, na, trunc_sq_dist)
            + _trunc_mean(_moving_sq_dist(engine, b, bmask, a, amask), bmask, nb, trunc_sq_dist))


# ----------------------------------------------------------------------------------------------
# public API

def _check_cloud(name: str, pc: Any, min_points: int) -> np.ndarray:
    a = np.asarray(pc)
    if a.ndim != 2 or a.shape[1] != 3:
        raise NSFPError(f'{name}: expected an (N,3) array, got shape {a.shape}')
    if not np.issubdtype(a.dtype, np.floating):
        raise NSFPError(f'{name}: expected float32 points, got dtype {a.dtype}')
    if len(a) < min_points:
        raise NSFPError(f'{name}: {len(a)} points, NSFP needs at least {min_points} '
                        '(empty after ground removal?)')
    if not np.isfinite(a).all():
        raise NSFPError(f'{name}: {int((~np.isfinite(a)).any(1).sum())} points with NaN/inf coordinates')
    return a.astype(np.float32, copy=False)


def _pad(clouds: list[np.ndarray], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    P = max(len(c) for c in clouds)
    x = np.zeros((len(clouds), P, 3), dtype=np.float32)
    m = np.zeros((len(clouds), P), dtype=bool)
    for k, c in enumerate(clouds):
        x[k, :len(c)] = c
        m[k, :len(c)] = True
    count = torch.tensor([float(len(c)) for c in clouds], device=device)
    return torch.from_numpy(x).to(device), torch.from_numpy(m).to(device), count


def run_nsfp(pc0: np.ndarray, pc1: np.ndarray, cfg: NSFPConfig | None = None, device: str = 'cpu',
             seed: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Estimate the residual flow (N,3) float32 of ``pc0`` towards ``pc1`` (both in ego0).

    Returns it with an info dict (status ok/failed, reason, iterations, loss, forward_loss, stop,
    seconds, points, fit_points, ...). Raises :class:`NSFPError` on bad input.
    """
    return run_nsfp_batch([(pc0, pc1)], cfg, device, None if seed is None else [seed])[0]


def run_nsfp_batch(pairs: Sequence[tuple[np.ndarray, np.ndarray]], cfg: NSFPConfig | None = None,
                   device: str | torch.device = 'cpu',
                   seeds: Sequence[int] | None = None) -> list[tuple[np.ndarray, dict[str, Any]]]:
    """Optimise K pairs in one batched optimisation (see the module docstring).

    One seed per pair (default ``cfg.seed``) fixes its initial weights and its subsample, so a
    pair's result is the same alone or in any batch. Raises :class:`NSFPError` on bad input.
    """
    cfg = cfg or NSFPConfig()
    if not pairs:
        return []
    seeds = [cfg.seed] * len(pairs) if seeds is None else list(seeds)
    if len(seeds) != len(pairs):
        raise NSFPError(f'seeds: expected {len(pairs)} seeds (one per pair), got {len(seeds)}')
    device = torch.device(device)
    engine = cfg.engine(device)
    t_start = time.perf_counter()

    full0, fit0, fit1, inits = [], [], [], []
    for k, ((a, b), s) in enumerate(zip(pairs, seeds)):
        a = _check_cloud(f'pair {k} pc0', a, cfg.min_points)
        b = _check_cloud(f'pair {k} pc1', b, cfg.min_points)
        full0.append(a)
        rng = np.random.default_rng(s)
        if cfg.fast:
            # Sorted so the subsample keeps the file order (irrelevant to the maths, handy to debug).
            if len(a) > cfg.fit_points:
                a = a[np.sort(rng.choice(len(a), cfg.fit_points, replace=False))]
            if len(b) > cfg.fit_points:
                b = b[np.sort(rng.choice(len(b), cfg.fit_points, replace=False))]
        fit0.append(a)
        fit1.append(b)
        inits.append(_init_mlp(torch.Generator().manual_seed(int(s)), cfg.hidden_units, cfg.hidden_layers))

    x0, m0, n0 = _pad(fit0, device)
    x1, m1, n1 = _pad(fit1, device)
    K = len(pairs)
    fwd = _stack_params(inits, device)
    bwd = _stack_params(inits, device)  # the backward MLP starts as a copy (deepcopy in the reference)
    opt = MaskedAdam(fwd + bwd, cfg.lr, cfg.betas, cfg.eps, cfg.weight_decay)
    # Directions whose target is fixed (warped -> pc1, cycle -> pc0) search the *full* clouds: a
    # subsampled target would add its own sampling gaps to the loss. The directions whose target
    # moves (pc1 -> warped, pc0 -> cycle) use the equally subsampled clouds, so both sides of
    # those have the same density, as in the faithful fit.
    if cfg.fast:
        full1 = [np.asarray(b, dtype=np.float32) for _, b in pairs]
        tgt1 = _FixedTarget(engine, *_pad(full1, device)[:2], cfg)
        tgt0 = _FixedTarget(engine, *_pad(full0, device)[:2], cfg)
    else:
        tgt1 = _FixedTarget(engine, x1, m1, cfg)
        tgt0 = _FixedTarget(engine, x0, m0, cfg)
    trunc = cfg.trunc_sq_dist

    best_fwd = [p.detach().clone() for p in fwd]     # rows indexed by the original pair index
    best_fwd_loss = torch.full((K,), math.inf, dtype=torch.float64)
    best_fwd_total = torch.full((K,), math.inf, dtype=torch.float64)
    es_best = torch.full((K,), math.nan, dtype=torch.float64)  # early stopping's reference value
    bad = torch.zeros(K, dtype=torch.long)
    iters = torch.zeros(K, dtype=torch.long)
    stop = ['max_iters'] * K
    fail: list[str | None] = [None] * K
    rows = torch.arange(K)  # original pair index of each row of the working tensors
    t_setup = time.perf_counter() - t_start

    for it in range(cfg.iters):
        opt.zero_grad()
        flow = mlp_forward(fwd, x0)
        warped = x0 + flow
        l_fwd = (_trunc_mean(tgt1.sq_dist(warped, m0), m0, n0, trunc)
                 + _trunc_mean(_moving_sq_dist(engine, x1, m1, warped, m0), m1, n1, trunc))
        cyc = warped - mlp_forward(bwd, warped)
        l_cyc = (_trunc_mean(tgt0.sq_dist(cyc, m0), m0, n0, trunc)
                 + _trunc_mean(_moving_sq_dist(engine, x0, m0, cyc, m0), m0, n0, trunc))
        loss = l_fwd + l_cyc
        # One host sync per iteration for the whole batch.
        lf, lt = torch.stack([l_fwd.detach(), loss.detach()]).double().cpu()
        iters[rows] += 1

        improved = lf <= best_fwd_loss[rows]
        if improved.any():
            orig = rows[improved]
            best_fwd_loss[orig] = lf[improved]
            best_fwd_total[orig] = lt[improved]
            sel = torch.nonzero(improved).flatten().to(device)
            for b, p in zip(best_fwd, fwd):
                b[orig.to(device)] = p.detach().index_select(0, sel)

        # EarlyStopping of the reference (utils.py): the first value only seeds `best`;
        # NaN stops; otherwise count iterations without an improvement of more than min_delta.
        live = torch.ones(len(rows), dtype=torch.bool)
        for r, k in enumerate(rows.tolist()):
            v = float(lt[r])
            if not math.isfinite(v):
                live[r] = False
                stop[k] = 'non_finite'
                fail[k] = f'optimisation diverged: non-finite loss at iteration {it}'
                continue
            if math.isnan(float(es_best[k])):
                es_best[k] = v
            elif v < float(es_best[k]) - cfg.min_delta:
                es_best[k] = v
                bad[k] = 0
            else:
                bad[k] += 1
                if int(bad[k]) >= cfg.eff_patience:
                    live[r] = False
                    stop[k] = 'early_stop'
        if not bool(live.any()):
            break
        loss.sum().backward()
        opt.step(live.to(device), cfg.lr_at(it))
        if not bool(live.all()):
            # Drop the stopped pairs from the working tensors, so a batch costs what its live
            # pairs cost (a GPU batch otherwise waits at full price for its slowest pair).
            keep = torch.nonzero(live).flatten()
            kd = keep.to(device)
            rows = rows[keep]
            x0, m0, n0 = x0[kd], m0[kd], n0[kd]
            x1, m1, n1 = x1[kd], m1[kd], n1[kd]
            tgt1, tgt0 = tgt1.select(keep), tgt0.select(keep)
            opt = opt.select(kd)
            fwd, bwd = opt.params[:len(fwd)], opt.params[len(fwd):]
    t_opt = time.perf_counter() - t_start - t_setup

    results = []
    with torch.no_grad():
        for k in range(K):
            pts = torch.from_numpy(full0[k]).to(device)
            params = [p[k:k + 1] for p in best_fwd]
            out = [mlp_forward(params, pts[s:s + cfg.query_chunk][None])[0]
                   for s in range(0, len(pts), cfg.query_chunk)]
            flow_k = torch.cat(out).cpu().numpy().astype(np.float32)
            reason = fail[k]
            if reason is None and not np.isfinite(flow_k).all():
                reason = 'optimisation diverged: non-finite flow'
            if reason is None and not math.isfinite(float(best_fwd_loss[k])):
                reason = 'optimisation diverged: no finite loss'
            results.append((flow_k, {
                'status': 'failed' if reason else 'ok',
                'reason': reason or '',
                'iterations': int(iters[k]),
                'loss': float(best_fwd_total[k]),
                'forward_loss': float(best_fwd_loss[k]),
                'stop': stop[k],
                'seconds': (time.perf_counter() - t_start) / K,
                'batch_seconds': time.perf_counter() - t_start,
                'setup_seconds': t_setup,
                'optim_seconds': t_opt,
                'points': len(full0[k]),
                'points1': len(pairs[k][1]),
                'fit_points': len(fit0[k]),
                'nn': engine,
                'fast': cfg.fast,
                'device': str(device),
                'batch': K,
            }))
    return results
