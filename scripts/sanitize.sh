#!/usr/bin/env bash
# The host tests that reach the native code, against a copy of it built with AddressSanitizer
# and UndefinedBehaviorSanitizer. Exits non-zero on any failing test and on any sanitizer
# report, from pytest or from any process it starts (CLI commands, device daemons).
#   scripts/sanitize.sh [PYTEST ARGS...]       e.g. -k fuse, or more test files
# The developer's in-place build is left alone: the package is copied to a temporary
# directory, _native is built there, and PYTHONPATH puts that copy first.
# UBLKSHELL_SANITIZE_KEEP=1 keeps that directory (build log, reports) for a look afterwards.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD
py="$root/.venv/bin/python"

# The pure-host tests that call into the C code: the recording code and its readers, the
# fault rule engine and its grammar, the power-cut write log, crafted statistics files, a
# daemon's statistics taken over on recovery, the server and the FUSE stats tree over real
# statistics, and the FUSE transport, whose daemons (native libfuse3 handlers, the same
# recording code) inherit this environment and so run sanitized too, with fault rules and power
# cuts through the shared pipeline (test_fuse_faults.py). Of the Hypothesis
# input tests only the one that installs rules through C: the rest is Python, and twice as
# slow here for nothing.
tests=(tests/test_records.py tests/test_trace_batch.py tests/test_fault_grammar.py tests/test_fault_engine.py
       tests/test_writelog.py tests/test_shm_input.py tests/test_recovery_args.py
       tests/test_server.py tests/test_server_inproc.py tests/test_fusetree.py
       tests/test_fuse_transport.py tests/test_fuse_faults.py tests/test_zones.py
       tests/test_inputs_fuzz.py::test_rule_lines_parse_to_rules_that_fit_and_round_trip
       tests/test_logdevice.py::test_the_log_orders_writes_as_dm_log_writes_does
       tests/test_logdevice.py::test_past_the_memory_bound_logging_stops_and_the_log_stays_valid
       tests/test_logdevice.py::test_a_fuse_device_log_replays_raw_io_byte_for_byte_at_every_mark
       tests/test_logdevice.py::test_past_its_memory_bound_a_device_stops_logging_and_says_so)

die() { echo "sanitize: $*" >&2; exit 1; }

runtime() {
  # gcc answers with the bare name when it has no such library
  local f
  f=$(gcc -print-file-name="$1")
  [ "$f" != "$1" ] && [ -e "$f" ] || die "gcc has no $1 (Debian: it comes with build-essential, through libgcc-N-dev)"
  readlink -f "$f"
}
asan=$(runtime libasan.so)
ubsan=$(runtime libubsan.so)

work=$(mktemp -d "${TMPDIR:-/tmp}/ublkshell-sanitize.XXXXXX")
if [ "${UBLKSHELL_SANITIZE_KEEP:-}" = 1 ]; then
  trap 'echo "sanitize: kept $work"' EXIT
else
  trap 'rm -rf "$work"' EXIT
fi

# pytest runs from $work (below): test paths given relative to the checkout must still work
args=()
for a in "$@"; do
  if [[ $a != -* && -e "$root/${a%%::*}" ]]; then args+=("$root/$a"); else args+=("$a"); fi
done

# only the sources: an in-place _native*.so in the copy could be imported instead of ours
tar -C "$root" --exclude='__pycache__' --exclude='*.so' -cf - ublkshell | tar -C "$work" -xf -
echo "sanitize: building _native with -fsanitize=address,undefined in $work"
start=$SECONDS
if ! (cd "$work" && UBLKSHELL_SANITIZE=1 "$py" ublkshell/native/build.py) >"$work/build.log" 2>&1; then
  tail -n 40 "$work/build.log" >&2
  die "the sanitized build failed"
fi
so=$(ls "$work"/ublkshell/_native*.so 2>/dev/null | head -n 1)
[ -n "$so" ] || die "the build produced no ublkshell/_native*.so"
readelf -d "$so" | grep -q 'NEEDED.*libasan' || die "$so is not linked against libasan"
echo "sanitize: built in $((SECONDS - start)) s"

# Runs inside pytest: a run that silently imported the ordinary build would prove nothing.
cat >"$work/ublkshell_sanitize_check.py" <<'EOF'
import os

import pytest


def pytest_configure(config):
    import ublkshell._native as native

    want = os.environ["UBLKSHELL_SANITIZED_COPY"] + os.sep
    got = os.path.realpath(native.__file__)
    if not got.startswith(want):
        raise pytest.UsageError(f"sanitize: imported {got}, not the sanitized build under {want}")
    with open("/proc/self/maps") as f:
        maps = f.read()
    for runtime in ("libasan", "libubsan"):
        if runtime not in maps:
            raise pytest.UsageError(f"sanitize: {runtime} is not loaded in the test process")
    # without it, UBSan's reports would only reach a stderr that tests capture
    import sitecustomize

    if not os.path.realpath(sitecustomize.__file__).startswith(want):
        raise pytest.UsageError(f"sanitize: sitecustomize came from {sitecustomize.__file__}")


def pytest_report_header(config):
    import ublkshell._native as native

    return f"ublkshell: sanitized build {native.__file__} (ASan + UBSan)"
EOF

# Every Python process of the run (pytest, CLI children, device daemons) imports this first.
# libubsan's own init hands log_path to __sanitizer_set_report_path, which the dynamic linker
# binds to libasan's copy (preloaded first), so UBSan itself would keep writing to stderr,
# where a test's capture swallows it: tell libubsan's copy directly, through its own handle.
cat >"$work/sitecustomize.py" <<'EOF'
import ctypes
import os

_ubsan = os.environ.get("UBLKSHELL_SANITIZE_UBSAN")
if _ubsan:
    ctypes.CDLL(_ubsan).__sanitizer_set_report_path(os.environ["UBLKSHELL_SANITIZE_REPORTS"].encode())
EOF

mkdir "$work/reports"
prefix="$work/reports/report"  # each process writes report.PID
rc=0
# From $work: `python -m` puts the current directory first on sys.path, and the checkout's
# own ublkshell must not be the one found.
(cd "$work" && env \
   LD_PRELOAD="$asan $ubsan" \
   ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:log_path=$prefix" \
   UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$prefix" \
   UBLKSHELL_SANITIZE_UBSAN="$ubsan" UBLKSHELL_SANITIZE_REPORTS="$prefix" \
   PYTHONPATH="$work" UBLKSHELL_SANITIZED_COPY="$work" \
   "$py" -m pytest -p ublkshell_sanitize_check -p no:cacheprovider -c "$root/pyproject.toml" \
     --rootdir "$root" -m "not vm" "${tests[@]/#/$root/}" ${args[@]+"${args[@]}"}) || rc=$?

# Reports go to files, so one from a daemon or a CLI child is not lost in a captured
# stderr; any report fails the run, even if every test passed.
shopt -s nullglob
reports=("$work"/reports/*)
if [ ${#reports[@]} -gt 0 ]; then
  for r in "${reports[@]}"; do
    printf '\n---- %s ----\n' "$(basename "$r")" >&2
    cat "$r" >&2
  done
  echo "sanitize: FAILED: ${#reports[@]} sanitizer report(s) (above)" >&2
  exit 1
fi
[ "$rc" -eq 0 ] || { echo "sanitize: FAILED: pytest exited $rc" >&2; exit "$rc"; }
echo "sanitize: passed, no sanitizer reports"
