#!/usr/bin/env bash
# One entry point for the two README commands:
#   ./run.sh demo   installs (first time only) and runs the live demo
#   ./run.sh test   installs (first time only) and runs the full test suite
# Anything after the verb is passed on (e.g. ./run.sh test -k pointcloud).
set -euo pipefail
cd "$(dirname "$0")"
verb=${1:-}; shift || true

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
VENV=${ZEROFLOW_VENV:-.venv}

# Re-install only when the dependency description changes: a second run starts in seconds.
want=$(cat setup.py run.sh | sha256sum | cut -c1-16)
stamp="$VENV/.zeroflow-installed-$want"
if [ ! -f "$stamp" ]; then
  echo "[run.sh] setting up $VENV (first run: a few minutes) ..."
  if [ ! -x "$VENV/bin/python" ]; then
    # Debian splits venv out of python3; install it when we can (root, apt), else say what is missing.
    if ! "$PY" -m venv "$VENV" 2>/dev/null; then
      rm -rf "$VENV"
      if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get install -y -q python3-venv >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q python3-venv >/dev/null; }
        "$PY" -m venv "$VENV"
      else
        echo "[run.sh] '$PY -m venv' failed: install python3-venv (sudo apt-get install python3-venv)" >&2; exit 1
      fi
    fi
  fi
  # A ROS wheel bootstrap flag inherited from another venv breaks rclpy's library path.
  unset _ROS_WHEELS_BOOTSTRAP_COMPLETE
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first, pinned: the CPU wheel; any looser spec pulls a multi-GB CUDA build.
  "$VENV/bin/python" -m pip install -q torch==2.13.0
  extras=ros
  [ "$verb" = test ] && extras=ros,dev
  [ -f "$VENV/.zeroflow-dev" ] && extras=ros,dev
  "$VENV/bin/python" -m pip install -q -e ".[$extras]"
  # Ouster pcap import: ouster-sdk pins rosbags==0.9.23, which lacks ROS 2 Kilted (we need >=0.10);
  # its pcap reader only needs numpy and an importable rosbags, so it goes in without its pins.
  "$VENV/bin/python" -m pip install -q --no-deps ouster-sdk==1.0.1
  [ "$extras" = ros,dev ] && touch "$VENV/.zeroflow-dev"
  rm -f "$VENV"/.zeroflow-installed-*
  touch "$stamp"
fi
if [ "$verb" = test ] && [ ! -f "$VENV/.zeroflow-dev" ]; then
  unset _ROS_WHEELS_BOOTSTRAP_COMPLETE
  "$VENV/bin/python" -m pip install -q -e ".[ros,dev]" && touch "$VENV/.zeroflow-dev"
fi

unset _ROS_WHEELS_BOOTSTRAP_COMPLETE
# DDS stays on this machine; a per-run domain keeps parallel runs apart.
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export ROS_DOMAIN_ID=${ROS_DOMAIN_ID:-$(( (RANDOM % 100) + 1 ))}
export PATH="$PWD/$VENV/bin:$PATH"

case "$verb" in
  demo) exec "$VENV/bin/zeroflow" demo "$@" ;;
  test)
    set +e
    "$VENV/bin/python" -m pytest test -q -rs --timeout=900 "$@"
    rc=$?
    # pytest exit 5 = no tests collected: a failure here, never a silent pass.
    [ $rc -eq 5 ] && echo "[run.sh] no tests were collected" >&2
    exit $rc ;;
  *) echo "usage: ./run.sh {demo|test} [args...]" >&2; exit 2 ;;
esac
