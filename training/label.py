"""``zeroflow label``: pseudo-label every pair of a split with a teacher (``--teacher``), at scale.

Teachers: ``rigid`` (default, :mod:`zeroflow_training.teacher.rigid`), ``hybrid`` and ``nsfp``; one
config object, :class:`zeroflow_training.teacher.TeacherConfig`, shared with ``zeroflow predict``.

Output is exactly the ``zeroflow predict`` layout, so ``zeroflow eval LABELS DATA_ROOT`` scores the
teacher directly: ``LABELS/<log_id>/<ts_ns of sweep t>.feather``, one row per point of sweep t in
lidar-file order, ``flow_tx_m, flow_ty_m, flow_tz_m`` (float32, AV2 convention ``q - p``, ego motion
included), ``is_dynamic`` (bool, ``|residual| >= 0.05 m``, av2's threshold) and ``is_valid`` (bool,
True where the teacher estimated the point: in range, not ground, pair not failed). Points the
teacher does not estimate get the flow of the static world (ego motion only). The manifest record
of the pair also travels in the file's schema metadata (key ``zeroflow_label``).

Work and failure model:

* One task per pair (``--batch-pairs K`` groups K pairs into one batched optimisation, for GPUs),
  on local processes (``ProcessPoolExecutor``, spawn, one torch thread each) or, with
  ``--ray ADDRESS``, as Ray remote tasks (``--ray local`` starts a local instance).
* Every file is written to a hidden temporary name and ``os.replace``-d into place, so a reader or a
  killed run never sees a partial file. A rerun skips pairs whose file exists and deletes stale
  temporaries: ``kill -9`` at any moment, then a rerun, ends with every pair labelled exactly once.
* ``LABELS/manifest.jsonl`` gets one JSON line per pair (status ok/failed, reason, iterations,
  seconds, points, ...), appended by the driver process with one ``write`` per line. On start a
  torn last line is dropped, duplicates are collapsed, and label files whose line is missing (killed
  between rename and append) get their line back from the file's own metadata.
* **A pair that cannot be labelled is never silently missing**: too few points, nothing left after
  ground removal, NaN coordinates, a diverging optimisation -> ``status: failed`` with the reason in
  the manifest, and its label file is still written with ``is_valid`` False everywhere and ego flow
  (0 for points whose coordinates are not finite), so every pair of the split has a file, training
  can mask failed pairs out, and ``zeroflow eval`` still runs (scoring them as ego motion).
  Errors that are not about the data (bugs, out of memory) stop the run loudly instead.
* One run per LABELS folder at a time (an exclusive lock on ``LABELS/.lock``).
"""
from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

log = logging.getLogger(__name__)

FLOW_COLUMNS = ('flow_tx_m', 'flow_ty_m', 'flow_tz_m')
DYNAMIC_THRESHOLD_M = 0.05   # av2 SCENE_FLOW_DYNAMIC_THRESHOLD, as zeroflow predict
MANIFEST = 'manifest.jsonl'
META_KEY = b'zeroflow_label'
TMP_SUFFIX = '.tmp'


class LabelError(ValueError):
    """Bad arguments, data or label folder for ``zeroflow label`` (names the file/field)."""


@dataclass(frozen=True)
class PairTask:
    log_dir: str
    log_id: str
    ts0: int
    ts1: int

    @property
    def key(self) -> tuple[str, int]:
        return (self.log_id, self.ts0)


def label_path(out: Path, log_id: str, ts0: int) -> Path:
    return Path(out) / log_id / f'{int(ts0)}.feather'


def pair_seed(base: int, log_id: str, ts0: int) -> int:
    """Per-pair seed: the same pair gets the same initial weights and subsample in any batch/order."""
    return (int(base) * 1_000_003 + zlib.crc32(f'{log_id}/{int(ts0)}'.encode())) % (2**31 - 1)


# ----------------------------------------------------------------------------------------------
# files

def _tmp_name(path: Path) -> Path:
    return path.with_name(f'.{path.name}.{os.getpid()}{TMP_SUFFIX}')


def write_label_file(path: Path, columns: dict[str, np.ndarray], record: dict[str, Any]) -> None:
    """Atomic write: a hidden temporary in the same folder, fsync, then rename into place."""
    import pyarrow as pa
    import pyarrow.feather as feather
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(columns).replace_schema_metadata({META_KEY: json.dumps(record).encode()})
    tmp = _tmp_name(path)
    try:
        feather.write_feather(table, tmp, compression='uncompressed')
        with open(tmp, 'rb') as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_label_file(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Columns and the embedded manifest record of a label file (LabelError if unreadable)."""
    import pyarrow.feather as feather
    try:
        table = feather.read_table(path)
    except Exception as exc:  # pyarrow raises many types for corrupt files
        raise LabelError(f'{path}: cannot read as feather ({exc})') from None
    missing = [c for c in FLOW_COLUMNS + ('is_dynamic', 'is_valid') if c not in table.column_names]
    if missing:
        raise LabelError(f'{path}: missing columns {missing} (has {table.column_names})')
    meta = (table.schema.metadata or {}).get(META_KEY)
    record = json.loads(meta) if meta else {}
    return {c: table.column(c).to_numpy() for c in table.column_names}, record


class Manifest:
    """``manifest.jsonl``: one line per pair, appended by one process with a single write each."""

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / MANIFEST
        self.records: dict[tuple[str, int], dict[str, Any]] = {}
        raw = self.path.read_bytes() if self.path.exists() else b''
        lines = raw.split(b'\n')
        torn = bool(raw) and not raw.endswith(b'\n')
        bad = 0
        count = 0
        for line in lines:
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                key = (str(r['log_id']), int(r['ts0']))
            except (ValueError, KeyError, TypeError):
                bad += 1
                continue
            count += 1
            self.records[key] = r
        if torn or bad or count != len(self.records):
            log.warning('%s: dropped %d unreadable and %d duplicate lines (torn write of a killed run); '
                        'rewriting', self.path, bad, count - len(self.records))
            self._rewrite()

    def _rewrite(self) -> None:
        tmp = _tmp_name(self.path)
        with open(tmp, 'wb') as f:
            for r in self.records.values():
                f.write(json.dumps(r, sort_keys=True).encode() + b'\n')
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def append(self, record: dict[str, Any]) -> None:
        key = (str(record['log_id']), int(record['ts0']))
        if key in self.records:
            return
        line = json.dumps(record, sort_keys=True).encode() + b'\n'
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
        self.records[key] = record


def _cleanup_temporaries(out: Path) -> int:
    n = 0
    for p in list(out.glob(f'.*{TMP_SUFFIX}')) + list(out.glob(f'*/.*{TMP_SUFFIX}')):
        p.unlink(missing_ok=True)
        n += 1
    return n


def _lock(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    fh = open(out / '.lock', 'w')
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise LabelError(f'{out}: another `zeroflow label` is writing here '
                         f'(lock {out / ".lock"} held)') from None
    return fh


# ----------------------------------------------------------------------------------------------
# labelling one batch of pairs (runs in a worker)

def _failed_columns(points0: np.ndarray, T: np.ndarray) -> dict[str, np.ndarray]:
    from zeroflow_ros.core.geometry import ego_flow
    with np.errstate(invalid='ignore'):
        flow = ego_flow(points0, T)
    flow[~np.isfinite(flow).all(axis=1)] = 0.0
    n = len(points0)
    cols = {c: np.ascontiguousarray(flow[:, i]) for i, c in enumerate(FLOW_COLUMNS)}
    cols['is_dynamic'] = np.zeros(n, dtype=bool)
    cols['is_valid'] = np.zeros(n, dtype=bool)
    return cols


def _ok_columns(points0: np.ndarray, T: np.ndarray, mask0: np.ndarray,
                residual: np.ndarray) -> dict[str, np.ndarray]:
    from zeroflow_ros.core.geometry import residual_to_av2
    n = len(points0)
    res = np.zeros((n, 3), dtype=np.float32)
    res[mask0] = residual
    with np.errstate(invalid='ignore'):
        flow = residual_to_av2(points0, res, T)
    flow[~np.isfinite(flow).all(axis=1)] = 0.0
    cols = {c: np.ascontiguousarray(flow[:, i]) for i, c in enumerate(FLOW_COLUMNS)}
    cols['is_dynamic'] = np.linalg.norm(res.astype(np.float64), axis=1) >= DYNAMIC_THRESHOLD_M
    cols['is_valid'] = mask0.copy()
    return cols


def _base_record(task: PairTask) -> dict[str, Any]:
    return {'log_id': task.log_id, 'ts0': int(task.ts0), 'ts1': int(task.ts1),
            'file': f'{task.log_id}/{int(task.ts0)}.feather', 'status': 'failed', 'reason': '',
            'iterations': 0, 'seconds': 0.0, 'points': 0, 'points_used': 0, 'points1_used': 0}


INFO_KEYS = ('iterations', 'loss', 'forward_loss', 'stop', 'fit_points', 'nn', 'device', 'batch',
             'batch_seconds', 'teacher', 'clusters', 'registered', 'moving_objects', 'adopted', 'nsfp_points')


def teacher_config(cfg: Any):
    """Return a :class:`TeacherConfig` for one, a bare ``NSFPConfig`` (NSFP teacher) or None (default)."""
    from zeroflow_training.teacher import TeacherConfig
    from zeroflow_training.teacher.nsfp import NSFPConfig
    if cfg is None:
        return TeacherConfig()
    if isinstance(cfg, NSFPConfig):
        return TeacherConfig('nsfp', nsfp=cfg)
    if not isinstance(cfg, TeacherConfig):
        raise LabelError(f'teacher config: expected TeacherConfig or NSFPConfig, got {type(cfg).__name__}')
    return cfg


def _run_teachers(todo: list, cfg: Any, device: str) -> list[tuple[Any, dict[str, Any]]]:
    """Teacher results of the prepared pairs: one batched NSFP optimisation, or one call per pair."""
    from zeroflow_training.teacher import run_teacher
    from zeroflow_training.teacher.nsfp import run_nsfp_batch
    if cfg.name == 'nsfp':
        seeds = [pair_seed(cfg.nsfp.seed, t.log_id, t.ts0) for _, t, *_ in todo]
        try:
            return run_nsfp_batch([(a, b) for *_, a, b in todo], cfg.nsfp, device, seeds)
        except ValueError as exc:  # NSFPError
            return [(None, {'status': 'failed', 'reason': f'NSFP refused the input: {exc}'})] * len(todo)
    results = []
    for _, t, _, T, _, a, b in todo:
        seed = pair_seed(cfg.rigid.seed, t.log_id, t.ts0)
        try:
            results.append(run_teacher(a, b, cfg, device, seed, dt=(t.ts1 - t.ts0) * 1e-9, ego1_T_ego0=T))
        except ValueError as exc:  # RigidError / NSFPError: the teacher refused this input
            results.append((None, {'status': 'failed', 'reason': f'{cfg.name} refused the input: {exc}'}))
    return results


def label_batch(tasks: list[PairTask], out: Path, cfg: Any = None, prep: Any = None,
                device: str = 'cpu') -> list[dict[str, Any]]:
    """Label ``tasks`` with the teacher of ``cfg`` (NSFP: one batched optimisation); one file per pair.

    Returns the manifest records. Data problems become ``failed`` records (see the module docstring).
    """
    from zeroflow_ros.core.preprocess import PreprocessConfig, prepare_pair
    from zeroflow_ros.data.av2 import AV2Log

    cfg = teacher_config(cfg)
    prep = prep or PreprocessConfig()
    out = Path(out)
    t0 = time.perf_counter()
    records: list[dict[str, Any]] = []
    todo = []  # (index in records, task, points0, T, mask0, pc0, pc1)
    files: list[dict[str, np.ndarray] | None] = []
    for task in tasks:
        rec = _base_record(task)
        records.append(rec)
        files.append(None)
        lg = AV2Log(Path(task.log_dir))
        try:
            pair = lg.pair(task.ts0, task.ts1, with_gt=False)
        except ValueError as exc:  # DataError: missing/corrupt sweep or pose
            rec['reason'] = f'cannot load pair: {exc}'
            files[-1] = None
            continue
        rec['points'] = len(pair.points0)
        T = pair.ego1_T_ego0
        bad0 = int((~np.isfinite(pair.points0)).any(axis=1).sum())
        bad1 = int((~np.isfinite(pair.points1)).any(axis=1).sum())
        if bad0 or bad1:
            rec['reason'] = (f'non-finite coordinates: {bad0} points in {lg.lidar_path(task.ts0)}, '
                             f'{bad1} in {lg.lidar_path(task.ts1)}')
            files[-1] = _failed_columns(pair.points0, T)
            continue
        try:
            pp = prepare_pair(pair.points0, pair.points1, T, prep,
                              is_ground0=pair.is_ground0, is_ground1=pair.is_ground1)
        except ValueError as exc:  # PreprocessError
            rec['reason'] = f'preprocessing failed: {exc}'
            files[-1] = _failed_columns(pair.points0, T)
            continue
        rec['points_used'], rec['points1_used'] = len(pp.pc0), len(pp.pc1)
        if min(len(pp.pc0), len(pp.pc1)) < cfg.min_points:
            rec['reason'] = (f'too few points after ground removal and range crop: {len(pp.pc0)} in sweep t, '
                             f'{len(pp.pc1)} in sweep t+1 (need >= {cfg.min_points})')
            files[-1] = _failed_columns(pair.points0, T)
            continue
        todo.append((len(records) - 1, task, pair.points0, T, pp.mask0, pp.pc0, pp.pc1))

    if todo:
        results = _run_teachers(todo, cfg, device)
        for (i, task, points0, T, mask0, _, _), (flow, info) in zip(todo, results):
            rec = records[i]
            rec['teacher'] = cfg.name
            for k in INFO_KEYS:
                if k in info:
                    rec[k] = info[k]
            rec['seconds'] = float(info.get('seconds', 0.0))
            if info.get('status') == 'ok':
                rec['status'] = 'ok'
                files[i] = _ok_columns(points0, T, mask0, flow)
            else:
                rec['reason'] = info.get('reason') or f'{cfg.name} failed'
                files[i] = _failed_columns(points0, T)

    wall = time.perf_counter() - t0
    for task, rec, cols in zip(tasks, records, files):
        rec['wall_seconds'] = wall / len(tasks)
        if cols is None:
            # The pair's own sweep could not be read: nothing to write a row for. The failed
            # manifest line is the record; the file is absent because its row count is unknown.
            log.warning('%s/%s: %s', task.log_id, task.ts0, rec['reason'])
            continue
        if rec['status'] != 'ok':
            log.warning('%s/%s failed: %s', task.log_id, task.ts0, rec['reason'])
        write_label_file(label_path(out, task.log_id, task.ts0), cols, rec)
    return records


# ----------------------------------------------------------------------------------------------
# scheduling

def list_tasks(data_root: Path, split: str, out: Path,
               limit: int | None = None) -> tuple[list[PairTask], int]:
    """Pairs still to label (files already written are skipped) and how many are done."""
    from zeroflow_ros.data.av2 import list_logs
    logs = list_logs(Path(data_root), split)
    if not logs:
        raise LabelError(f'{Path(data_root) / split}: no logs with sensors/lidar/ found')
    todo, done = [], 0
    for lg in logs:
        ts = lg.timestamps
        for a, b in zip(ts[:-1], ts[1:]):
            if label_path(out, lg.log_id, int(a)).exists():
                done += 1
                continue
            if limit is not None and len(todo) >= limit:
                continue
            todo.append(PairTask(str(lg.log_dir), lg.log_id, int(a), int(b)))
    return todo, done


def _batches(tasks: list[PairTask], k: int) -> list[list[PairTask]]:
    return [tasks[i:i + k] for i in range(0, len(tasks), k)]


_WORKER_READY = False


def _init_worker(threads: int) -> None:
    global _WORKER_READY
    os.environ.setdefault('OMP_NUM_THREADS', str(threads))
    import torch
    torch.set_num_threads(threads)
    _WORKER_READY = True


def _worker_label(tasks: list[PairTask], out: str, cfg_dict: dict, prep_dict: dict, device: str,
                  threads: int = 1) -> list[dict[str, Any]]:
    if not _WORKER_READY:
        _init_worker(threads)
    from zeroflow_ros.core.preprocess import PreprocessConfig

    from zeroflow_training.teacher import TeacherConfig
    return label_batch(tasks, Path(out), TeacherConfig.from_dict(cfg_dict),
                       PreprocessConfig.from_dict(prep_dict), device)


def _run_local(batches, out, cfg_dict, prep_dict, device, workers, threads) -> Iterator[list[dict]]:
    if workers <= 1:
        for b in batches:
            yield _worker_label(b, str(out), cfg_dict, prep_dict, device, threads)
        return
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context('spawn'),
                             initializer=_init_worker, initargs=(threads,)) as pool:
        # A bounded number in flight keeps the driver's memory flat on 100k-pair splits.
        it = iter(batches)
        pending = set()
        for b in it:
            pending.add(pool.submit(_worker_label, b, str(out), cfg_dict, prep_dict, device, threads))
            if len(pending) >= 4 * workers:
                break
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                yield fut.result()
                nxt = next(it, None)
                if nxt is not None:
                    pending.add(pool.submit(_worker_label, nxt, str(out), cfg_dict, prep_dict, device,
                                            threads))


def _run_ray(batches, out, cfg_dict, prep_dict, device, address, workers, threads,
             gpus_per_task: float) -> Iterator[list[dict]]:
    try:
        import ray
    except ImportError:
        raise LabelError('--ray needs the ray package: pip install "zeroflow_ros[ray]"') from None
    if address == 'local':
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)
    try:
        remote = ray.remote(num_cpus=threads, num_gpus=gpus_per_task if device.startswith('cuda') else 0,
                            max_retries=2)(_worker_label)
        it = iter(batches)
        pending = []
        limit = 1000
        for b in it:
            pending.append(remote.remote(b, str(out), cfg_dict, prep_dict, device, threads))
            if len(pending) >= limit:
                break
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                yield ray.get(ref)
                nxt = next(it, None)
                if nxt is not None:
                    pending.append(remote.remote(nxt, str(out), cfg_dict, prep_dict, device, threads))
    finally:
        ray.shutdown()


def run_label(data_root: Path, split: str, out: Path, cfg: Any = None, prep: Any = None,
              device: str = 'cpu', workers: int = 1, batch_pairs: int = 1, limit: int | None = None,
              ray_address: str | None = None, threads: int = 1, gpus_per_task: float = 0.5,
              progress: Callable[..., Any] | None = None) -> dict[str, int]:
    """Label a split (library entry of the CLI); returns counts {done_before, ok, failed, total}.

    ``cfg``: a :class:`zeroflow_training.teacher.TeacherConfig`, a bare ``NSFPConfig`` (NSFP teacher)
    or None (the default teacher).
    """
    from zeroflow_ros.core.preprocess import PreprocessConfig
    cfg = teacher_config(cfg)
    prep = prep or PreprocessConfig()
    if workers < 1 or batch_pairs < 1 or threads < 1:
        raise LabelError(f'--workers, --batch-pairs, --threads must be >= 1, '
                         f'got {workers}, {batch_pairs}, {threads}')
    if limit is not None and limit < 0:
        raise LabelError(f'--limit must be >= 0, got {limit}')
    out = Path(out)
    lock = _lock(out)
    try:
        stale = _cleanup_temporaries(out)
        if stale:
            log.info('%s: removed %d temporaries of an interrupted run', out, stale)
        manifest = Manifest(out)
        _recover_manifest(out, manifest)
        tasks, done_before = list_tasks(data_root, split, out, limit)
        counts = {'done_before': done_before, 'ok': 0, 'failed': 0, 'total': len(tasks)}
        if not tasks:
            return counts
        cfg_dict = cfg.to_dict()
        prep_dict = prep.to_dict()
        batches = _batches(tasks, batch_pairs)
        if ray_address:
            stream = _run_ray(batches, out, cfg_dict, prep_dict, device, ray_address, workers, threads,
                              gpus_per_task)
        else:
            stream = _run_local(batches, out, cfg_dict, prep_dict, device, workers, threads)
        bar = progress(total=len(tasks)) if progress else None
        t0 = time.perf_counter()
        for records in stream:
            for r in records:
                manifest.append(r)
                counts['ok' if r['status'] == 'ok' else 'failed'] += 1
            if bar is not None:
                bar.update(len(records))
                n = counts['ok'] + counts['failed']
                bar.set_postfix(pairs_per_hour=f'{3600 * n / max(1e-9, time.perf_counter() - t0):.0f}',
                                failed=counts['failed'])
        if bar is not None:
            bar.close()
        return counts
    finally:
        lock.close()


def _recover_manifest(out: Path, manifest: Manifest) -> None:
    """Give back the manifest line of label files written by a run killed before its append."""
    for path in sorted(out.glob('*/*.feather')):
        try:
            key = (path.parent.name, int(path.stem))
        except ValueError:
            continue
        if key in manifest.records:
            continue
        try:
            _, rec = read_label_file(path)
        except LabelError as exc:
            # os.replace makes this impossible for our own files; a foreign/corrupt file is
            # removed so the pair is labelled again rather than kept unreadable.
            log.warning('%s; removing it so the pair is labelled again', exc)
            path.unlink()
            continue
        if rec:
            manifest.append(rec)


# ----------------------------------------------------------------------------------------------
# CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('data_root', type=Path,
                        help='dataset root holding <split>/<log_id>/... (AV2 layout), or a rosbag2 / Ouster '
                             'pcap: imported first (as `zeroflow data import`) into OUT.data/')
    parser.add_argument('--sensor-xyz', type=float, nargs=3, default=(0.0, 0.0, 0.0), metavar=('X', 'Y', 'Z'),
                        help='with a bag or pcap: the lidar in the base frame, m (as `zeroflow data import`)')
    parser.add_argument('--sensor-rpy', type=float, nargs=3, default=(0.0, 0.0, 0.0), metavar=('R', 'P', 'Y'),
                        help='with a bag or pcap: the lidar roll, pitch, yaw in the base frame, rad')
    parser.add_argument('--split', default='train', help='split folder under DATA_ROOT (default train)')
    parser.add_argument('--out', required=True, type=Path,
                        help='LABELS folder: <log_id>/<ts>.feather + manifest.jsonl')
    from zeroflow_training.teacher import DEFAULT_TEACHER, TEACHERS
    parser.add_argument('--teacher', default=DEFAULT_TEACHER, choices=TEACHERS,
                        help=f'pseudo-label teacher (default {DEFAULT_TEACHER}: the best measured, see '
                             'training/teacher/README.md); --nn/--faithful/--iters/--fit-points set '
                             'its NSFP part')
    parser.add_argument('--workers', type=int, default=None,
                        help='local processes, or Ray CPUs with --ray local '
                             '(default: CPU count; 2 with cuda)')
    parser.add_argument('--ray', metavar='ADDRESS', default=None,
                        help="run tasks on a Ray cluster (ray.init(address=...)); 'local' starts one here")
    parser.add_argument('--device', default='cpu', choices=('cpu', 'cuda', 'auto'))
    parser.add_argument('--batch-pairs', type=int, default=None, metavar='K',
                        help='pairs optimised together as one batched problem '
                             '(default: 8 with cuda, 1 on CPU)')
    parser.add_argument('--limit', type=int, default=None, metavar='N', help='label at most N more pairs')
    parser.add_argument('--nn', default='auto', choices=('auto', 'dt', 'kdtree', 'brute'),
                        help='NN step of the loss (auto: kdtree on CPU, brute force on GPU)')
    parser.add_argument('--faithful', action='store_true',
                        help='original NSFP (all points, 5000 iterations, no schedule): slow, the reference')
    parser.add_argument('--iters', type=int, default=None, help='override the iteration cap')
    parser.add_argument('--fit-points', type=int, default=None, help='fast variant: subsample size per cloud')
    parser.add_argument('--seed', type=int, default=1234)
    parser.add_argument('--ground', default='auto', choices=('auto', 'map', 'geometric', 'none'),
                        help='ground removal: map raster when the log has one (auto), else geometric')
    parser.add_argument('--threads', type=int, default=1, help='torch threads per task (default 1)')
    parser.add_argument('--gpus-per-task', type=float, default=0.5, help='Ray GPU share per task with cuda')
    parser.add_argument('--no-progress', action='store_true', help='no progress bar')


def config_from_args(args: argparse.Namespace):
    """Build the :class:`TeacherConfig` of the command line (NSFP flags set the NSFP part of nsfp/hybrid)."""
    import dataclasses

    from zeroflow_training.teacher import TeacherConfig
    from zeroflow_training.teacher.rigid import RigidConfig
    name = getattr(args, 'teacher', 'nsfp')
    base = TeacherConfig(name)
    kw: dict[str, Any] = {'nn': args.nn, 'seed': args.seed}
    if args.fit_points is not None:
        kw['fit_points'] = args.fit_points
    if args.iters is not None:
        kw['max_iters' if args.faithful else 'fast_max_iters'] = args.iters
    nsfp = None
    if base.nsfp is not None:
        nsfp = dataclasses.replace(base.nsfp, fast=not args.faithful, **kw)
    return TeacherConfig(name, rigid=RigidConfig(seed=args.seed), nsfp=nsfp, hybrid=base.hybrid)


def imported_root(source: Path, out: Path, split: str, sensor_xyz=(0.0, 0.0, 0.0),
                  sensor_rpy=(0.0, 0.0, 0.0)) -> Path:
    """Return the AV2 root to label: ``source`` itself, or a bag/pcap imported into ``OUT.data/``.

    A recording is imported once (``zeroflow_ros.data.importer``, the code of ``zeroflow data
    import``: poses from the bag's odometry or KISS-ICP, de-skewed); a rerun finds the imported log
    and labels on (resumable as always). Train with ``--data OUT.data``.
    """
    source = Path(source)
    if not (source.is_file() or (source / 'metadata.yaml').is_file()):
        return source                     # an AV2-layout root (checked by list_tasks)
    from zeroflow_ros.data.av2 import DataError
    from zeroflow_ros.data.importer import detect_kind, import_source
    try:
        kind = detect_kind(source)
    except DataError as exc:
        raise LabelError(str(exc)) from None
    root = Path(str(out).rstrip('/') + '.data')
    split_dir = root / split
    if kind in ('bag', 'pcap') and not (split_dir.is_dir() and any(split_dir.iterdir())):
        try:
            res = import_source(source, root, split=split, sensor_xyz=tuple(sensor_xyz),
                                sensor_rpy=tuple(sensor_rpy))
        except DataError as exc:
            raise LabelError(f'{source}: import failed: {exc}') from None
        log.info('imported %s into %s (%s)', source, root, res)
    print(f'labelling the {kind} {source} as the AV2-layout root {root} (train with --data {root})')
    return root


def run(args: argparse.Namespace) -> int:
    from zeroflow_ros.core.preprocess import PreprocessConfig
    device = args.device
    if device == 'auto':
        import torch
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device.startswith('cuda'):
        import torch
        if not torch.cuda.is_available():
            raise LabelError('--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False)')
    on_gpu = device.startswith('cuda')
    # On one GPU, two processes overlap data loading with the other's optimisation; more only
    # time-slice the GPU. A CPU runs one single-threaded process per core.
    workers = args.workers or (2 if on_gpu else (os.cpu_count() or 1))
    batch_pairs = args.batch_pairs or (8 if on_gpu else 1)
    cfg = config_from_args(args)
    prep = PreprocessConfig(ground=args.ground)
    progress: Callable[..., Any] | None = None
    if not args.no_progress:
        from tqdm import tqdm

        def _bar(total: int):
            return tqdm(total=total, unit='pair', desc='label', smoothing=0.1)
        progress = _bar
    data_root = imported_root(args.data_root, args.out, args.split, args.sensor_xyz, args.sensor_rpy)
    t0 = time.perf_counter()
    counts = run_label(data_root, args.split, args.out, cfg, prep, device, workers, batch_pairs,
                       args.limit, args.ray, args.threads, args.gpus_per_task, progress)
    dt = time.perf_counter() - t0
    n = counts['ok'] + counts['failed']
    print(f'labelled {n} pairs ({counts["ok"]} ok, {counts["failed"]} failed) in {dt:.1f} s'
          f'{f" ({3600 * n / dt:.0f} pairs/hour)" if n else ""}; {counts["done_before"]} were already done; '
          f'manifest: {Path(args.out) / MANIFEST}')
    if counts['failed']:
        print(f'{counts["failed"]} pairs failed (label files with is_valid False and ego flow); '
              'reasons in the manifest')
    return 0
