#!/usr/bin/env bash
# One entry point for a fresh Debian machine: installs what emu needs, then runs a job.
#   ./emu.sh demo    boot a real guest on emu's devices and show them working
#   ./emu.sh test    the test suite (what CI runs)
#   ./emu.sh bench   the benchmarks
#   ./emu.sh emu ... any emu command inside the project's environment
set -euo pipefail
cd "$(dirname "$0")"
VENV=${EMU_VENV:-.venv}

need_apt=()
command -v python3 >/dev/null || need_apt+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
command -v gcc >/dev/null || need_apt+=(gcc)
python3 -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))' 2>/dev/null \
  || need_apt+=(python3-dev)
# the native blk data plane's storage engines: io_uring files, NBD network storage
[ -f /usr/include/liburing.h ] || need_apt+=(liburing-dev)
[ -f /usr/include/libnbd.h ] || need_apt+=(libnbd-dev)
if ((${#need_apt[@]})); then
  SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${need_apt[@]}"
fi

stamp="$VENV/.emu-installed"
if [ ! -x "$VENV/bin/python" ]; then python3 -m venv "$VENV"; fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ] \
   || [ -n "$(find emu \( -name '*.pyx' -o -name '*.pxd' \) -newer "$stamp" -print -quit)" ]; then
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -e '.[test]'
  touch "$stamp"
fi
PY="$VENV/bin/python"

guest_deps() { [ -x scripts/install-guest-deps.sh ] && scripts/install-guest-deps.sh; return 0; }

job=${1:-demo}; shift || true
case "$job" in
  demo)  guest_deps; exec "$VENV/bin/emu" demo "$@" ;;
  test)  guest_deps; exec "$PY" -m pytest "$@" ;;
  bench) for b in bench/*.py; do case "$b" in */test_*) ;; *) "$PY" "$b";; esac; done
         exec "$PY" -m pytest bench --benchmark-enable "$@" ;;
  emu)   exec "$VENV/bin/emu" "$@" ;;
  *) echo "usage: $0 demo|test|bench|emu ARGS" >&2; exit 2 ;;
esac
