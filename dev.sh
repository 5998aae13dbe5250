#!/usr/bin/env bash
# One-stop set-up and entry points: `bash dev.sh demo` (main job) or `bash dev.sh test` (test suite).
# Creates .venv with Python 3.11 (or $PYTHON), installs optkit with every backend, then runs.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
export TF_CPP_MIN_LOG_LEVEL=3 TF_ENABLE_ONEDNN_OPTS=0 PIP_DISABLE_PIP_VERSION_CHECK=1

setup() {  # $1: extras
    if [ ! -x .venv/bin/python ]; then "$PYTHON" -m venv .venv; fi
    .venv/bin/python -m pip install -q -c constraints.txt -e ".[$1]"
    # Test-only, without their dependencies: Hugging Face's TF OPT needs tf-keras (whose deps would pull full
    # tensorflow); peft and accelerate (adapter and big-model tests) would otherwise move the pins.
    if [[ "$1" == *test* ]]; then
        .venv/bin/python -m pip install -q --no-deps "tf-keras~=2.21.0" "peft==0.21.2" "accelerate==1.15.0"
    fi
}

case "${1:-}" in
    demo) shift; setup all; exec .venv/bin/optkit parity "$@" ;;
    # Two pytest-xdist workers, each test file on one of them (a file's module fixtures are built once);
    # OPTKIT_TEST_WORKERS=0 runs in this process, and a later -n in the arguments wins.
    test) shift; setup "all,test"
          exec .venv/bin/python -m pytest -n "${OPTKIT_TEST_WORKERS:-2}" --dist loadfile "$@" ;;
    *) echo "usage: bash dev.sh demo [optkit parity options] | bash dev.sh test [pytest options]" >&2; exit 2 ;;
esac
