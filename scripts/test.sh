#!/usr/bin/env bash
# The project's one test command (README and CI run exactly this).
#   scripts/test.sh [PYTEST ARGS...]      extra args go to every pytest run
# Phase 1 runs the host tests; phase 2 runs the host tests that reach the C code again, against
# a copy built with ASan and UBSan (scripts/sanitize.sh); phase 3 boots one VM with a real
# ublk_drv (the newest packaged kernel) and runs tests/vm there; phase 4 boots Debian's stable
# kernel (6.12, far fewer ublk features) and runs the `basics` VM tests, so the fallbacks are
# proven on a kernel that needs them; that short run uses one guest CPU and runs beside phase 3
# (its output is shown after it; beside the host tests it would skew their timing). UBLKSHELL_SKIP_VM=1
# skips phases 3 and 4 (quick local loops only; never a full pass).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD
py="$root/.venv/bin/python"

header() { printf '\n======== %s ========\n' "$*"; }

header "setup"
scripts/setup.sh

old_status=skipped
old_rc=0

header "host tests: pytest -m 'not vm' tests"
host_rc=0
"$py" -m pytest -m "not vm" tests "$@" || host_rc=$?
# Extra args may select only VM tests, leaving nothing to collect on the host.
if [ "$host_rc" -eq 5 ]; then
  echo "test: no host tests selected"
  host_rc=0
fi

header "sanitizer tests: scripts/sanitize.sh (ASan + UBSan build of the native code)"
san_rc=0
scripts/sanitize.sh "$@" || san_rc=$?
if [ "$san_rc" -eq 5 ]; then
  echo "test: no sanitizer tests selected"
  san_rc=0
fi

vm_status=skipped
vm_rc=0
if [ "${UBLKSHELL_SKIP_VM:-}" = 1 ]; then
  header "VM TESTS SKIPPED (UBLKSHELL_SKIP_VM=1): THIS IS NOT A FULL TEST RUN"
else
  old_log=$(mktemp /tmp/ublkshell-stable-vm.XXXXXX)
  ( rc=0
    "$py" -m ublkshell.vm --kernel stable --cpus 1 --timeout 1500 -- \
      "$py" -m pytest -m "vm and basics" tests/vm -v "$@" > "$old_log" 2>&1 || rc=$?
    echo "$rc" > "$old_log.rc" ) &
  old_pid=$!
  trap 'pkill -TERM -P "$old_pid" 2>/dev/null || true; rm -f "$old_log" "$old_log.rc"' EXIT
  echo "test: the stable kernel's VM run started beside this one (its output follows)"

  header "VM tests: pytest -m vm tests/vm, inside a VM with ublk_drv (first run fetches a kernel)"
  "$py" -m ublkshell.vm --timeout 3300 -- "$py" -m pytest -m vm tests/vm -v --durations=20 "$@" || vm_rc=$?
  if [ "$vm_rc" -eq 5 ]; then
    echo "test: the VM run collected no tests; a VM suite that ran nothing is a failure" >&2
  fi
  if [ "$vm_rc" -eq 0 ]; then vm_status=passed; else vm_status="FAILED (exit $vm_rc)"; fi

  header "VM tests on the stable kernel: pytest -m 'vm and basics' tests/vm (ran beside the one above)"
  wait "$old_pid" || true
  cat "$old_log"
  old_rc=$(cat "$old_log.rc" 2>/dev/null || echo 1)
  if [ "$old_rc" -eq 5 ]; then
    echo "test: the stable-kernel VM run collected no tests; that is a failure" >&2
  fi
  if [ "$old_rc" -eq 0 ]; then old_status=passed; else old_status="FAILED (exit $old_rc)"; fi
fi

header "summary"
if [ "$host_rc" -eq 0 ]; then echo "host tests: passed"; else echo "host tests: FAILED (exit $host_rc)"; fi
if [ "$san_rc" -eq 0 ]; then echo "sanitizer tests: passed"; else echo "sanitizer tests: FAILED (exit $san_rc)"; fi
echo "VM tests: $vm_status"
echo "VM tests on the stable kernel (basics): $old_status"
if [ "$vm_status" = skipped ]; then
  echo "WARNING: VM tests were skipped (UBLKSHELL_SKIP_VM=1)" >&2
fi
[ "$host_rc" -eq 0 ] && [ "$san_rc" -eq 0 ] && [ "$vm_rc" -eq 0 ] && [ "$old_rc" -eq 0 ]
