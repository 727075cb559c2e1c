#!/usr/bin/env bash
# GPU check in one run of under 8 minutes: bash benchmarks/gpu_check.sh [--dry-run] [OUT_DIR]
#
# 1. mamba-ssm: when `import mamba_ssm` fails (and not --dry-run, and GPU_CHECK_SKIP_INSTALL is unset), try
#    `pip install --no-build-isolation mamba-ssm` (built from source against the installed torch; MAMBA_FORCE_BUILD
#    so setup.py does not try to download a wheel from GitHub) under `timeout` (GPU_CHECK_INSTALL_TIMEOUT seconds,
#    default 120). What happened (installed / already_installed / timeout / failed / skipped, seconds, exit code,
#    log) goes to OUT_DIR/mamba_install.json and into gpu_check.json.
# 2. python benchmarks/gpu_check.py with the time left of GPU_CHECK_BUDGET (default 460 s of the 8 minutes),
#    each part under its own hard cap (see the script's docstring). Writes OUT_DIR/gpu_check.json.
# OUT_DIR defaults to $OUT when set, else ./gpu_check_out. Exit status: gpu_check.py's (2: no CUDA without --dry-run).
set -u
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-460}
INSTALL_CAP=${GPU_CHECK_INSTALL_TIMEOUT:-120}
PYTHON=${PYTHON:-python}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

DRY=()
OUT_DIR=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=(--dry-run) ;;
    -h|--help) sed -n '2,10p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) OUT_DIR=$arg ;;
  esac
done
OUT_DIR=${OUT_DIR:-${OUT:-$PWD/gpu_check_out}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
RECORD="$OUT_DIR/mamba_install.json"
INSTALL_LOG="$OUT_DIR/mamba_install.log"

record() {  # status seconds rc note
  printf '{"status": "%s", "seconds": %s, "exit_code": %s, "timeout_s": %s, "log": "%s", "note": "%s"}\n' \
    "$1" "$2" "$3" "$INSTALL_CAP" "$INSTALL_LOG" "$4" > "$RECORD"
  echo "gpu_check.sh: mamba-ssm: $1 ($2 s) $4" >&2
}

if [ ${#DRY[@]} -eq 0 ] && ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  exec "$PYTHON" "$HERE/gpu_check.py" --out "$OUT_DIR"  # no CUDA: it says so and exits 2; nothing installed
fi
if [ ${#DRY[@]} -gt 0 ]; then
  record skipped 0 null "dry run: nothing installed"
elif [ -n "${GPU_CHECK_SKIP_INSTALL:-}" ]; then
  record skipped 0 null "GPU_CHECK_SKIP_INSTALL is set"
elif "$PYTHON" -c "import mamba_ssm.ops.selective_scan_interface" >/dev/null 2>&1; then
  record already_installed 0 null "$("$PYTHON" -c 'import mamba_ssm; print(mamba_ssm.__version__)' 2>/dev/null)"
else
  T0=$(date +%s)
  # build requirements first (--no-build-isolation builds with what is installed); --no-deps: never touch torch
  timeout -k 10 "$INSTALL_CAP" bash -c "
    '$PYTHON' -m pip install --timeout 15 --retries 1 ninja packaging wheel einops &&
    MAMBA_FORCE_BUILD=TRUE MAX_JOBS=\${MAX_JOBS:-\$(nproc)} TORCH_CUDA_ARCH_LIST=\${TORCH_CUDA_ARCH_LIST:-9.0} \
      '$PYTHON' -m pip install --timeout 15 --retries 1 --no-build-isolation --no-deps mamba-ssm
  " > "$INSTALL_LOG" 2>&1
  RC=$?
  SECONDS_USED=$(( $(date +%s) - T0 ))
  if [ $RC -eq 124 ] || [ $RC -eq 137 ]; then
    record timeout "$SECONDS_USED" "$RC" "pip killed after ${INSTALL_CAP} s (still downloading or compiling the CUDA kernels: see the log)"
  elif [ $RC -ne 0 ]; then
    record failed "$SECONDS_USED" "$RC" "$(tail -n 1 "$INSTALL_LOG" | tr -d '"\\' | cut -c1-200)"
  elif "$PYTHON" -c "import mamba_ssm.ops.selective_scan_interface" >/dev/null 2>&1; then
    record installed "$SECONDS_USED" 0 ""
  else
    record failed "$SECONDS_USED" 0 "pip succeeded but mamba_ssm does not import"
  fi
fi

LEFT=$(( BUDGET - ($(date +%s) - START) ))
[ "$LEFT" -lt 60 ] && LEFT=60
exec "$PYTHON" "$HERE/gpu_check.py" ${DRY[@]+"${DRY[@]}"} --out "$OUT_DIR" --budget "$LEFT" --install-record "$RECORD"
