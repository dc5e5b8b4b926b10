#!/usr/bin/env bash
# GPU check for issue #7 (export + TensorRT + GPU latency), prepared to run ONCE on a lent
# H100/H200 through the device tool, from the repository root:
#
#   run(command="bash bench/gpu_check.sh", timeout_s=420)            # plain image
#   run(command="bash bench/gpu_check.sh", timeout_s=420, carry=[".whl"])  # with carried wheels
#
# Needs no network and no pip install of this repo: the image's python3 (torch+CUDA, onnx,
# onnxruntime, numpy, pyyaml, pytest) is enough; the repo is put on PYTHONPATH and training/ is
# exposed as zeroflow_training through a symlink. Wheels in .whl/ (if carried) are installed into
# a private target first. Everything lands in $OUT (gpu_check.json, tables, logs). Finishes in
# < 6 minutes: gpu_check.py stops starting new steps after --budget-s and each phase has a timeout.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
PY=${PYTHON:-python3}
start=$(date +%s)

if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/zf_site .whl/*.whl > "$OUT/pip.log" 2>&1 \
    && export PYTHONPATH=/tmp/zf_site${PYTHONPATH:+:$PYTHONPATH} \
    || echo "carried wheels failed to install (see pip.log); continuing without them"
fi
SHIM=$(mktemp -d)
ln -s "$PWD/training" "$SHIM/zeroflow_training"
export PYTHONPATH="$PWD:$SHIM${PYTHONPATH:+:$PYTHONPATH}"

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$PY" - <<'PYEOF'
import importlib
for name in ('torch', 'onnx', 'onnxruntime', 'tensorrt', 'numpy', 'yaml'):
    try:
        m = importlib.import_module(name)
        extra = ''
        if name == 'torch':
            extra = f' cuda={m.version.cuda} available={m.cuda.is_available()}'
        if name == 'onnxruntime':
            extra = f' providers={m.get_available_providers()}'
        print(f'{name} {getattr(m, "__version__", "?")}{extra}')
    except Exception as exc:
        print(f'{name} MISSING ({type(exc).__name__}: {exc})')
PYEOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

timeout 290 "$PY" bench/gpu_check.py --out "$OUT" --budget-s 250 2>&1 | tee "$OUT/gpu_check.log"
rc1=${PIPESTATUS[0]}
timeout 50 "$PY" -m pytest test/test_backends.py -m gpu -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log"
rc2=${PIPESTATUS[0]}
echo "gpu_check.py rc=$rc1, gpu tests rc=$rc2, $(( $(date +%s) - start )) s in all"
exit $(( rc1 != 0 || rc2 != 0 ))
