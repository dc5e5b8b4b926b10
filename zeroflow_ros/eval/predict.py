"""``zeroflow predict``: per-sweep scene flow of an AV2-layout split, in the official AV2 layout.

For every sweep t of every log that has a successor, writes ``OUT/<log_id>/<ts_ns of t>.feather``
with ``flow_tx_m, flow_ty_m, flow_tz_m`` (float32, AV2 convention: ``q - p``, includes ego motion,
see :mod:`zeroflow_ros.core.geometry`) and ``is_dynamic`` (bool), one row per point of sweep t in
lidar-file order. Points a method does not estimate (ground, out of range, invalid) get the flow of
the static world (ego motion only). ``is_dynamic`` is ``|residual| >= 0.05 m`` over the pair
(av2 ``SCENE_FLOW_DYNAMIC_THRESHOLD``) unless the method gives its own.

Methods (all estimate *residual* flow of the points :func:`zeroflow_ros.core.preprocess.prepare_pair`
keeps, i.e. in range and non-ground; flow of sweep t in ego0, sweep t+1 brought into ego0):

* ``student``: the FastFlow3D student through :func:`zeroflow_ros.backends.create_backend`.
* ``nsfp``: the NSFP teacher, :func:`zeroflow_training.teacher.nsfp.run_nsfp` (per-pair optimisation).
* ``teacher``: the default pseudo-label teacher with its default settings, exactly what ``zeroflow label``
  runs without ``--teacher`` (:data:`zeroflow_training.teacher.DEFAULT_TEACHER`, one
  :class:`zeroflow_training.teacher.TeacherConfig`).
* ``ego``: the static world (residual 0 everywhere).
* ``zero``: AV2 flow 0 everywhere (the "nothing moves, not even us" baseline).
* ``nn``: displacement to the nearest kept point of t+1 after ego compensation (scipy cKDTree).

Runs are resumable (existing files are skipped; each file is written to a temporary name and
renamed into place). ``--submission MASKS.zip`` also packs the official AV2 challenge archive:
per mask file ``<log_id>/<ts>.feather`` of the mask archive, the masked rows with float16 flow and
bool ``is_dynamic`` (exactly the four columns av2 ``make_submission_archive.validate`` accepts).
"""
from __future__ import annotations

import argparse
import io
import logging
import os
import zipfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from zeroflow_ros.core.geometry import av2_to_residual, residual_to_av2
from zeroflow_ros.core.preprocess import PreparedPair, PreprocessConfig, prepare_pair
from zeroflow_ros.eval.masks import mask_names, parse_name, read_mask

log = logging.getLogger(__name__)

METHODS = ('student', 'teacher', 'nsfp', 'ego', 'zero', 'nn')
FLOW_COLUMNS = ('flow_tx_m', 'flow_ty_m', 'flow_tz_m')
SUBMISSION_COLUMNS = FLOW_COLUMNS + ('is_dynamic',)
DYNAMIC_THRESHOLD_M = 0.05  # av2 SCENE_FLOW_DYNAMIC_THRESHOLD
DEFAULT_MODEL = 'models/default'


class PredictError(ValueError):
    """Bad arguments, data or prediction files for ``zeroflow predict`` (names the file/field)."""


@dataclass
class MethodOutput:
    residual: np.ndarray                 # (N,3) float32 over all points of sweep t, 0 = static world
    is_dynamic: np.ndarray | None = None  # (N,) bool when the method has its own segmentation
    flow_av2: np.ndarray | None = None    # (N,3) float32 when the method speaks AV2 flow directly


class FlowMethod:
    """One way to estimate flow; subclasses implement :meth:`estimate`."""

    name = 'base'

    def __init__(self, preprocess: PreprocessConfig | None = None) -> None:
        self.preprocess = preprocess or PreprocessConfig()

    def estimate(self, points0: np.ndarray, prep: PreparedPair) -> MethodOutput:
        raise NotImplementedError

    #: the time step (s) of the pair the next :meth:`estimate` sees (None before the first pair)
    dt: float | None = None

    def begin_pair(self, ts0: int, ts1: int) -> None:
        """Hear the sweep times of the next :meth:`estimate` (methods with speed limits use the interval)."""
        self.dt = (int(ts1) - int(ts0)) * 1e-9

    def describe(self) -> str:
        return self.name


def _scatter(n: int, mask: np.ndarray, values: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    out = np.zeros((n, 3), dtype=np.float32)
    idx = np.flatnonzero(mask)
    if valid is not None:
        idx, values = idx[valid], values[valid]
    out[idx] = values
    return out


class EgoMethod(FlowMethod):
    name = 'ego'

    def estimate(self, points0, prep):
        return MethodOutput(np.zeros((len(points0), 3), dtype=np.float32))


class ZeroMethod(FlowMethod):
    name = 'zero'

    def estimate(self, points0, prep):
        zero = np.zeros((len(points0), 3), dtype=np.float32)
        return MethodOutput(av2_to_residual(points0, zero, prep.ego1_T_ego0), flow_av2=zero)


class NearestNeighbourMethod(FlowMethod):
    name = 'nn'

    def estimate(self, points0, prep):
        from scipy.spatial import cKDTree
        n = len(points0)
        if len(prep.pc0) == 0 or len(prep.pc1) == 0:
            return MethodOutput(np.zeros((n, 3), dtype=np.float32))
        _, idx = cKDTree(prep.pc1.astype(np.float64)).query(prep.pc0.astype(np.float64), k=1)
        residual = (prep.pc1[idx].astype(np.float64) - prep.pc0.astype(np.float64)).astype(np.float32)
        return MethodOutput(_scatter(n, prep.mask0, residual))


class StudentMethod(FlowMethod):
    name = 'student'

    def __init__(self, model: str, backend: str = 'auto', device: str = 'auto',
                 preprocess: PreprocessConfig | None = None, motion_evidence: bool = True) -> None:
        super().__init__(preprocess)
        from zeroflow_ros.backends import create_backend
        from zeroflow_ros.pipeline import PipelineConfig, make_motion_evidence
        self.backend = create_backend(model, backend, device)
        # the node's post-network check, with its defaults (AV2 logs are in the base frame already)
        self.evidence = make_motion_evidence(PipelineConfig(motion_evidence=motion_evidence))

    def estimate(self, points0, prep):
        residual, valid = self.backend.infer(prep.pc0, prep.pc1)
        residual = np.asarray(residual, dtype=np.float32)
        valid = np.asarray(valid, dtype=bool)
        if residual.shape != (len(prep.pc0), 3) or valid.shape != (len(prep.pc0),):
            raise PredictError(f'backend {self.backend.name}: returned flow {residual.shape} / valid '
                               f'{valid.shape} for {len(prep.pc0)} points')
        if self.evidence is not None:
            # the pair's own time step; the nominal 10 Hz if a caller never announced the pair
            dt = self.dt if self.dt and self.dt > 0 else 0.1
            residual = self.evidence(residual, valid, prep.pc0, prep.pc1, dt_s=dt)
        return MethodOutput(_scatter(len(points0), prep.mask0, residual, valid))

    def describe(self) -> str:
        try:
            return f'student ({self.backend.describe()})'
        except Exception:  # describe is informative only
            return 'student'


class NSFPMethod(FlowMethod):
    name = 'nsfp'

    def __init__(self, device: str = 'auto', preprocess: PreprocessConfig | None = None,
                 config: dict[str, Any] | None = None) -> None:
        super().__init__(preprocess)
        from zeroflow_training.teacher import nsfp
        self._run = nsfp.run_nsfp
        self.config = nsfp.NSFPConfig(**(config or {}))
        self.device = _resolve_device(device)

    def estimate(self, points0, prep):
        n0, n1 = len(prep.pc0), len(prep.pc1)
        if min(n0, n1) < self.config.min_points:
            # NSFP refuses near-empty clouds; the static world is the honest answer for them.
            log.warning('nsfp: %d / %d scored points (< min_points %d): static-world flow for this sweep',
                        n0, n1, self.config.min_points)
            return MethodOutput(np.zeros((len(points0), 3), dtype=np.float32))
        residual, _info = self._run(prep.pc0, prep.pc1, self.config, self.device)
        residual = np.asarray(residual, dtype=np.float32)
        if residual.shape != (n0, 3):
            raise PredictError(f'run_nsfp returned flow {residual.shape} for {n0} points')
        return MethodOutput(_scatter(len(points0), prep.mask0, residual))

    def describe(self) -> str:
        variant = 'fast' if self.config.fast else 'faithful'
        return f'nsfp ({variant}, {self.config.iters} iterations max, {self.device})'


class TeacherMethod(FlowMethod):
    """The default teacher of ``zeroflow label`` (same config object, same defaults)."""

    name = 'teacher'

    def __init__(self, device: str = 'auto', preprocess: PreprocessConfig | None = None,
                 config: Any = None) -> None:
        super().__init__(preprocess)
        from zeroflow_training.teacher import TeacherConfig, run_teacher
        self._run = run_teacher
        self.config = config or TeacherConfig()  # the CLI always uses the default
        self.device = _resolve_device(device) if self.config.name != 'rigid' else 'cpu'

    def estimate(self, points0, prep):
        n0, n1 = len(prep.pc0), len(prep.pc1)
        if min(n0, n1) < self.config.min_points:
            log.warning('teacher: %d / %d scored points (< min_points %d): static-world flow for this sweep',
                        n0, n1, self.config.min_points)
            return MethodOutput(np.zeros((len(points0), 3), dtype=np.float32))
        residual, _info = self._run(prep.pc0, prep.pc1, self.config, self.device, dt=self.dt,
                                    ego1_T_ego0=prep.ego1_T_ego0)
        residual = np.asarray(residual, dtype=np.float32)
        if residual.shape != (n0, 3):
            raise PredictError(f'teacher {self.config.name} returned flow {residual.shape} for {n0} points')
        return MethodOutput(_scatter(len(points0), prep.mask0, residual))

    def describe(self) -> str:
        return f'teacher ({self.config.name}, default settings, {self.device})'


def _resolve_device(device: str) -> str:
    if device != 'auto':
        return device
    try:
        import torch
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    except ImportError:
        return 'cpu'


def resolve_default_model(model: str) -> str:
    """``models/default`` in the working directory, else the source tree's or the installed copy."""
    if model != DEFAULT_MODEL or Path(model).exists():
        return model
    import sys
    here = Path(__file__).resolve()
    for cand in (here.parents[2] / DEFAULT_MODEL,
                 Path(sys.prefix) / 'share' / 'zeroflow_ros' / DEFAULT_MODEL):
        if cand.exists():
            return str(cand)
    return model  # the backend names what is missing


def make_method(name: str, model: str | None = None, backend: str = 'auto', device: str = 'auto',
                preprocess: PreprocessConfig | None = None,
                nsfp_config: dict[str, Any] | None = None, motion_evidence: bool = True) -> FlowMethod:
    """Build a method by name; unknown names raise and list the valid ones."""
    if name == 'ego':
        return EgoMethod(preprocess)
    if name == 'zero':
        return ZeroMethod(preprocess)
    if name == 'nn':
        return NearestNeighbourMethod(preprocess)
    if name == 'student':
        return StudentMethod(resolve_default_model(model or DEFAULT_MODEL), backend, device, preprocess,
                             motion_evidence)
    if name == 'nsfp':
        return NSFPMethod(device, preprocess, nsfp_config)
    if name == 'teacher':
        return TeacherMethod(device, preprocess)
    raise PredictError(f'unknown method {name!r}; valid: {METHODS}')


def flow_table(points0: np.ndarray, ego1_T_ego0: np.ndarray, out: MethodOutput) -> dict[str, np.ndarray]:
    """Columns of a prediction file from a method's output (AV2 flow + is_dynamic)."""
    n = len(points0)
    if out.residual.shape != (n, 3):
        raise PredictError(f'method returned residual {out.residual.shape}, expected ({n}, 3)')
    flow = out.flow_av2 if out.flow_av2 is not None else residual_to_av2(points0, out.residual, ego1_T_ego0)
    flow = np.asarray(flow, dtype=np.float32)
    # A non-finite input point keeps a non-finite flow (it is never evaluated); anything else is a bug.
    bad = ~np.isfinite(flow).all(axis=1) & np.isfinite(points0).all(axis=1)
    if bad.any():
        raise PredictError(f'method produced {int(bad.sum())} non-finite flow rows for finite points')
    if out.is_dynamic is not None:
        dyn = np.asarray(out.is_dynamic, dtype=bool)
    else:
        dyn = np.linalg.norm(out.residual.astype(np.float64), axis=1) >= DYNAMIC_THRESHOLD_M
    cols = {c: np.ascontiguousarray(flow[:, i]) for i, c in enumerate(FLOW_COLUMNS)}
    cols['is_dynamic'] = dyn
    return cols


def write_feather_atomic(path: Path, columns: dict[str, np.ndarray]) -> None:
    """Write a feather file under a temporary name in the same folder, then rename it into place."""
    import pyarrow as pa
    import pyarrow.feather as feather
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
    try:
        # Uncompressed like pandas' default writer of the official files; readers need no codec.
        feather.write_feather(pa.table(columns), tmp, compression='uncompressed')
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def output_path(out_dir: Path, log_id: str, ts0: int) -> Path:
    return Path(out_dir) / log_id / f'{int(ts0)}.feather'


# --- work distribution ------------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    log_dir: str
    ts0: int
    ts1: int


_WORKER: dict[str, Any] = {}


def _init_worker(method_kwargs: dict, out_dir: str) -> None:
    _WORKER['method'] = make_method(**method_kwargs)
    _WORKER['out'] = Path(out_dir)


def predict_pair(method: FlowMethod, log, ts0: int, ts1: int, out_dir: Path) -> Path:
    """Estimate one pair and write its file; returns the path written."""
    pair = log.pair(ts0, ts1, with_gt=False)
    prep = prepare_pair(pair.points0, pair.points1, pair.ego1_T_ego0, method.preprocess,
                        is_ground0=pair.is_ground0, is_ground1=pair.is_ground1)
    method.begin_pair(ts0, ts1)
    out = method.estimate(pair.points0, prep)
    path = output_path(out_dir, pair.log_id, ts0)
    write_feather_atomic(path, flow_table(pair.points0, pair.ego1_T_ego0, out))
    return path


def _run_job(job: Job) -> str:
    from zeroflow_ros.data.av2 import AV2Log
    return str(predict_pair(_WORKER['method'], AV2Log(Path(job.log_dir)), job.ts0, job.ts1, _WORKER['out']))


def list_jobs(data_root: Path, split: str, out_dir: Path,
              only: set[tuple[str, int]] | None = None) -> tuple[list[Job], int]:
    """Pairs still to predict (skipping files already written) and the number already done."""
    from zeroflow_ros.data.av2 import list_logs
    logs = list_logs(Path(data_root), split)
    if not logs:
        raise PredictError(f'{Path(data_root) / split}: no logs with sensors/lidar/ found')
    jobs, done = [], 0
    for lg in logs:
        ts = lg.timestamps
        for t0, t1 in zip(ts[:-1], ts[1:]):
            if only is not None and (lg.log_id, int(t0)) not in only:
                continue
            if output_path(out_dir, lg.log_id, int(t0)).exists():
                done += 1
                continue
            jobs.append(Job(str(lg.log_dir), int(t0), int(t1)))
    return jobs, done


def run_jobs(jobs: list[Job], method_kwargs: dict, out_dir: Path, workers: int = 1,
             progress: Callable[[Iterable], Iterable] | None = None) -> int:
    """Predict every job (in-process for one worker, else a process pool); returns files written."""
    if not jobs:
        return 0
    bar = progress or (lambda it, **kw: it)
    if workers <= 1:
        _init_worker(method_kwargs, str(out_dir))
        log.info('method: %s', _WORKER['method'].describe())
        for job in bar(jobs, total=len(jobs)):
            _run_job(job)
        return len(jobs)
    with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker,
                             initargs=(method_kwargs, str(out_dir))) as pool:
        futures = [pool.submit(_run_job, j) for j in jobs]
        for fut in bar(as_completed(futures), total=len(futures)):
            fut.result()  # re-raise the first worker error here, naming its file
    return len(jobs)


# --- submission archive ------------------------------------------------------------------------

def write_submission(pred_dir: Path, mask_zip: Path, archive: Path) -> int:
    """Pack the official challenge archive from full-row prediction files; returns entries written."""
    import pandas as pd
    import pyarrow.feather as feather
    names = mask_names(mask_zip)
    archive = Path(archive)
    archive.parent.mkdir(parents=True, exist_ok=True)
    tmp = archive.with_name(f'.{archive.name}.{os.getpid()}.tmp')
    try:
        with zipfile.ZipFile(mask_zip) as masks, zipfile.ZipFile(tmp, 'w') as zf:
            for name in names:
                mask = read_mask(masks, name)
                src = Path(pred_dir) / name
                if not src.is_file():
                    raise PredictError(f'{src}: prediction missing for mask entry {name}')
                tab = feather.read_table(src)
                missing = [c for c in SUBMISSION_COLUMNS if c not in tab.column_names]
                if missing:
                    raise PredictError(f'{src}: missing columns {missing}')
                if tab.num_rows != len(mask):
                    raise PredictError(f'{src}: {tab.num_rows} rows but the mask {name} has {len(mask)} '
                                       '(predictions must have one row per lidar point)')
                df = pd.DataFrame({c: tab.column(c).to_numpy()[mask].astype(np.float16)
                                   for c in FLOW_COLUMNS})
                df['is_dynamic'] = tab.column('is_dynamic').to_numpy()[mask].astype(bool)
                buf = io.BytesIO()
                df.to_feather(buf)
                zf.writestr(name, buf.getvalue())
        os.replace(tmp, archive)
    finally:
        if tmp.exists():
            tmp.unlink()
    return len(names)


# --- CLI ---------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('data_root', type=Path,
                        help='dataset root holding <split>/<log_id>/... (AV2 layout)')
    parser.add_argument('--split', required=True, help='split folder under DATA_ROOT (e.g. val)')
    parser.add_argument('--method', required=True, choices=METHODS, help='flow estimator')
    parser.add_argument('--model', default=DEFAULT_MODEL,
                        help=f'student model folder/.onnx/.pt/.engine (default {DEFAULT_MODEL})')
    parser.add_argument('--backend', default='auto', choices=('auto', 'tensorrt', 'onnxruntime', 'torch'))
    parser.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda'))
    parser.add_argument('--ground', default='auto', choices=('auto', 'map', 'geometric', 'none'),
                        help='ground removal before estimation: auto = the map raster when the log has one, '
                        'else geometric (default)')
    parser.add_argument('--out', required=True, type=Path, help='output folder <log_id>/<ts>.feather')
    parser.add_argument('--submission', type=Path, metavar='MASKS.zip',
                        help='also write the AV2 challenge archive OUT.zip using this mask archive')
    parser.add_argument('--submission-out', type=Path, help='archive path (default: OUT with .zip suffix)')
    parser.add_argument('--only-masked', action='store_true',
                        help='with --submission, predict only the sweeps the mask archive lists')
    parser.add_argument('--every', type=int, default=1,
                        help='predict only every N-th pair of the split, the same pairs '
                             '`zeroflow eval --every N` scores (e.g. 5, as the AV2 leaderboard does)')
    parser.add_argument('--nsfp-set', action='append', default=[], metavar='KEY=VALUE',
                        help='nsfp: override an NSFPConfig field (YAML value), e.g. --nsfp-set '
                             'fit_points=3072 --nsfp-set fast_max_iters=350 (what `zeroflow label '
                             '--fit-points/--iters` set)')
    parser.add_argument('--nsfp-faithful', action='store_true',
                        help='nsfp: the original optimisation (5000 iterations, all points)')
    parser.add_argument('--workers', type=int, default=1, help='processes (CPU methods scale, GPU: keep 1)')
    parser.add_argument('--no-motion-evidence', action='store_true',
                        help='student: publish the network flow without the node\'s motion-evidence check '
                             '(motion_evidence, on by default as in the node)')


def _nsfp_overrides(args: argparse.Namespace) -> dict[str, Any] | None:
    import yaml
    cfg: dict[str, Any] = {'fast': False} if getattr(args, 'nsfp_faithful', False) else {}
    for item in getattr(args, 'nsfp_set', []) or []:
        key, sep, value = item.partition('=')
        if not sep or not key:
            raise PredictError(f'--nsfp-set: expected KEY=VALUE, got {item!r}')
        cfg[key.strip()] = yaml.safe_load(value)
    if cfg:
        import dataclasses

        from zeroflow_training.teacher.nsfp import NSFPConfig
        valid = {f.name for f in dataclasses.fields(NSFPConfig)}
        unknown = sorted(set(cfg) - valid)
        if unknown:
            raise PredictError(f'--nsfp-set: unknown NSFPConfig field(s) {unknown}; valid: {sorted(valid)}')
    return cfg or None


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm
    if args.workers < 1:
        raise PredictError(f'--workers: expected >= 1, got {args.workers}')
    if args.only_masked and args.submission is None:
        raise PredictError('--only-masked needs --submission MASKS.zip')
    names = mask_names(args.submission) if args.submission is not None else None
    only = {parse_name(n) for n in names} if (names is not None and args.only_masked) else None
    every = getattr(args, 'every', 1)
    if every < 1:
        raise PredictError(f'--every: expected >= 1, got {every}')
    if every > 1:
        # The same selection as the evaluator's, so predictions and scores always cover one set.
        from zeroflow_ros.eval.evaluate import list_eval_pairs
        pairs = list_eval_pairs(args.data_root, args.split, every)
        picked = {(Path(j.log_dir).name, int(j.ts0)) for j in pairs}
        only = picked if only is None else only & picked
    jobs, done = list_jobs(args.data_root, args.split, args.out, only)
    method_kwargs = dict(name=args.method, model=str(args.model), backend=args.backend, device=args.device,
                         preprocess=PreprocessConfig(ground=args.ground),
                         nsfp_config=_nsfp_overrides(args), motion_evidence=not args.no_motion_evidence)
    print(f'{args.method}: {len(jobs)} sweeps to predict, {done} already in {args.out}')
    run_jobs(jobs, method_kwargs, args.out, args.workers,
             progress=lambda it, total: tqdm(it, total=total, unit='sweep', desc=args.method))
    if args.submission is not None:
        archive = args.submission_out or args.out.with_suffix('.zip')
        n = write_submission(args.out, args.submission, archive)
        print(f'submission archive: {archive} ({n} sweeps)')
    return 0
