#!/usr/bin/env bash
# Prepare this checkout for development and tests: system packages, .venv, editable install.
# Safe to run again; it only does what is missing (the editable install is always refreshed
# so the native extension is rebuilt from the current sources).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# build-essential also brings gcc's ASan and UBSan runtimes (gcc-N -> libgcc-N-dev -> libasan,
# libubsan), which scripts/sanitize.sh preloads: nothing more to list for them
packages=(build-essential pkg-config liburing-dev libfuse3-dev fuse3 fio e2fsprogs xfsprogs
          util-linux qemu-system-x86 busybox-static cpio xz-utils kmod tmux python3-venv blktrace
          zsh bash-completion f2fs-tools btrfs-progs dmsetup)

missing=()
for p in "${packages[@]}"; do
  [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)" = installed ] || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: system packages present"
else
  sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "setup: missing packages ${missing[*]}; run as root" >&2; exit 1; }
    sudo=(sudo)
  fi
  echo "setup: installing ${missing[*]}"
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ -x .venv/bin/python ]; then
  echo "setup: .venv present"
else
  echo "setup: creating .venv"
  python3 -m venv .venv
fi

echo "setup: pip install -e '.[test]' (builds the native extension; compat mode: a plain path entry, since the finder hook costs ~0.7 s per interpreter under emulation)"
.venv/bin/pip install -q -e '.[test]' --config-settings editable_mode=compat
echo "setup: done"
