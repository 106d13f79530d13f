#!/usr/bin/env bash
# On a GPU machine: build with CUDA, run every CUDA test and the GPU benchmarks, write one JSON report.
# Usage: bench/gpu_check.sh [--out DIR] [--budget-s 450] [--dry-run]   (PYTHON: the interpreter holding torch)
# The stages, their time limits and the report are bench/gpu_check.py's; this wrapper only picks the Python.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
