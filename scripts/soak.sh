#!/usr/bin/env bash
# The soak run against the real ublk_drv (scripts/soak.py --help says what it does and its
# options): kill + recover under fio verify, del of devices that withhold IO, a server killed
# mid-IO. Runs here when this kernel has ublk_drv (/dev/ublk-control), else in the bundled VM.
#   scripts/soak.sh [--only kill-recover|hung-del|server-kill] [--cycles N] [--rounds N] [--json FILE] ...
# UBLKSHELL_SOAK_VM_TIMEOUT (seconds, default 6 h) bounds the VM run.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$here/.venv/bin/python"
[ -x "$py" ] || (cd "$here" && scripts/setup.sh)
for arg in "$@"; do
  case "$arg" in -h|--help) exec "$py" "$here/scripts/soak.py" "$@" ;; esac
done
if [ -e /dev/ublk-control ]; then
  exec "$py" "$here/scripts/soak.py" "$@"
fi
# the guest starts in this same directory, so a relative --json FILE lands where it would here
exec "$py" -m ublkshell.vm --timeout "${UBLKSHELL_SOAK_VM_TIMEOUT:-21600}" -- "$py" "$here/scripts/soak.py" "$@"
