"""int8 variant of a model's ONNX file for onnxruntime on CPU (static quantisation of the convs).

The int8 file lives beside the fp32 one as ``model.int8.onnx`` with a sidecar ``model.int8.yaml``
naming the sha256 of the fp32 ONNX it was made from, its own sha256, the calibration data and the
accuracy measured when it was made. The backend refuses an int8 file whose source is not the
model's current ONNX (a retrained model needs a new int8 file; see :func:`int8_command`).

What is quantised and why (bench/bench_quant.py): only ``Conv`` nodes, QDQ format, per-channel
int8 weights, uint8 activations, min-max calibration on synthetic pairs: of the variants measured,
the fastest (~22-30 % less network CPU time) at +1.4 % EPE 3-way (40 synthetic val pairs). It
costs +8-10 % static EPE (about 1 mm), more than the 2 % the results table may lose, so fp32
stays the default and int8 is opt-in (``precision: int8``). Keeping the full-resolution decoder
in fp32 halved the static loss and most of the gain; the QOperator format and quantising the
``Gemm`` heads were worse on static EPE.
"""
from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from zeroflow_ros.backends.base import BackendError
from zeroflow_ros.manifest import Manifest, sha256_file

INT8_ONNX = 'model.int8.onnx'
INT8_INFO = 'model.int8.yaml'
#: quantize_static settings of the adopted variant (bench_quant.py: int8_qdq_conv)
ADOPTED = {'format': 'QDQ', 'ops': ['Conv']}


def int8_command(model_dir: Path | str) -> str:
    """Return the commands that (re)build the int8 file of ``model_dir``."""
    return ('zeroflow data synth /tmp/zf_cal --sequences 2 --sweeps 4 --seed 500 && '
            f'python bench/bench_quant.py --model {model_dir} --calib /tmp/zf_cal --write-int8')


def int8_path(manifest: Manifest) -> Path:
    """Return the checked int8 ONNX of a model folder; BackendError says what is wrong and the fix."""
    import yaml

    d = manifest.directory
    onnx, info_path = d / INT8_ONNX, d / INT8_INFO
    if not onnx.is_file() or not info_path.is_file():
        raise BackendError(f'onnxruntime int8: {onnx} (+ {INT8_INFO}) not found; build it with: '
                           f'{int8_command(d)}')
    try:
        info = yaml.safe_load(info_path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise BackendError(f'onnxruntime int8: cannot read {info_path}: {exc}') from None
    if info.get('source_onnx_sha256') != manifest.onnx_sha256:
        raise BackendError(f'onnxruntime int8: {onnx} was made from another model.onnx (sha256 '
                           f'{str(info.get("source_onnx_sha256"))[:12]}..., model has '
                           f'{manifest.onnx_sha256[:12]}...): '
                           f'rebuild it with: {int8_command(d)}')
    if info.get('sha256') != sha256_file(onnx):
        raise BackendError(f'onnxruntime int8: {onnx} does not match the sha256 in {info_path}; '
                           f'rebuild it with: {int8_command(d)}')
    return onnx


def write_int8(manifest: Manifest, feeds: Iterable[dict[str, np.ndarray]], calibration: dict[str, Any],
               accuracy: dict[str, Any] | None = None, settings: dict[str, Any] | None = None) -> Path:
    """Quantise ``manifest``'s ONNX with ``feeds`` (network inputs) into the model folder, atomically."""
    import yaml

    d = manifest.directory
    tmp = d / f'.{INT8_ONNX}.{os.getpid()}.tmp'
    quantize_onnx(manifest.onnx_path, tmp, list(feeds), settings or ADOPTED)
    os.replace(tmp, d / INT8_ONNX)
    info = {'source_onnx_sha256': manifest.onnx_sha256, 'sha256': sha256_file(d / INT8_ONNX),
            'settings': dict(settings or ADOPTED), 'calibration': calibration, 'accuracy': accuracy or {},
            'made_at': dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')}
    tmp_info = d / f'.{INT8_INFO}.{os.getpid()}.tmp'
    tmp_info.write_text(yaml.safe_dump(info, sort_keys=False))
    os.replace(tmp_info, d / INT8_INFO)
    return d / INT8_ONNX


def quantize_onnx(src: Path, out: Path, feeds: list[dict[str, np.ndarray]], settings: dict[str, Any]) -> None:
    """Quantise statically: per-channel int8 weights, uint8 activations, min-max calibration on ``feeds``.

    ``settings``: ``format`` (QDQ | QOperator), ``ops`` (op types), optional ``exclude`` (node-name
    prefixes kept in fp32; the exporter names nodes after the torch modules, so they hold for any
    model of the same architecture) and ``calibrate`` (MinMax | Percentile | Entropy, default MinMax).
    """
    if not feeds:
        raise BackendError('int8 quantisation: no calibration pairs given')
    try:
        from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                              QuantType, quantize_static)
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as exc:
        raise BackendError(f'int8 quantisation needs onnxruntime with its quantization tools: '
                           f'{exc}') from None

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(feeds)

        def get_next(self):
            return next(self._it, None)

    # Fold constants first: the exported graph computes conv biases from BatchNorm constants,
    # which the quantiser cannot read as initializers.
    pre = out.with_name(out.name + '.pre.onnx')
    try:
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        import onnx
        exclude = tuple(settings.get('exclude', ()))
        keep = [n.name for n in onnx.load(str(pre)).graph.node if exclude and n.name.startswith(exclude)]
        quantize_static(str(pre), str(out), Reader(), quant_format=getattr(QuantFormat, settings['format']),
                        op_types_to_quantize=list(settings['ops']), per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=keep,
                        calibrate_method=getattr(CalibrationMethod, settings.get('calibrate', 'MinMax')))
    finally:
        pre.unlink(missing_ok=True)
