#!/usr/bin/env bash
# The long fuzz run (docs/reliability.md): hostile socket messages and faults-file writes
# against a live server with devices. Runs in the bundled VM (real ublk_drv) unless this
# kernel has ublk_drv itself or --host is given (then FUSE-transport devices, no fault rules).
#   scripts/fuzz.sh [--host] [--messages N] [--fault-writes N] [--seed S] [--clients N]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py="$PWD/.venv/bin/python"
[ -x "$py" ] || scripts/setup.sh
if [ "${1:-}" = --host ] || [ -e /dev/ublk-control ]; then
  [ "${1:-}" = --host ] && shift
  exec "$py" scripts/fuzz_live.py "$@"
fi
exec "$py" -m ublkshell.vm --timeout 3600 -- "$py" "$PWD/scripts/fuzz_live.py" "$@"
