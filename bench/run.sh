#!/usr/bin/env bash
# Run the vetd benchmark: bash bench/run.sh [--files N --passes N ...]   (as root)
# Compiles bench/opener.c and bench/reference_listener.c into bench/build/, then runs
# bench/bench.py with the given flags. Installs gcc only if it is missing, and vetd (pip
# install -e, which builds its compiled read loop) only if it cannot be imported with it.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BUILD="$HERE/build"
TIMEOUT="${BENCH_TIMEOUT:-900}"   # outer guard, seconds; the default run takes under a minute

if [ "$(id -u)" -ne 0 ]; then
    echo "bench: run as root (fanotify permission events and mount need it)" >&2
    exit 2
fi

if ! command -v gcc >/dev/null 2>&1 || [ ! -e /usr/include/linux/fanotify.h ]; then
    echo "bench: installing gcc and headers" >&2
    apt-get install -y gcc libc6-dev linux-libc-dev >&2
fi

# vetd itself: its Python dependencies and the compiled read loop (vetd/_hotpath.c, built in
# place by an editable install). Without them the vetd scenarios would not run, or would run
# the pure-Python loop and measure that instead.
REPO="$(cd "$HERE/.." && pwd)"
so=$(ls "$REPO"/vetd/_hotpath*.so 2>/dev/null | head -n 1 || true)
if ! (cd "$REPO" && python3 -c 'import yara, xxhash, sdnotify, vetd._hotpath') >/dev/null 2>&1 ||
    [ -z "$so" ] || [ "$REPO/vetd/_hotpath.c" -nt "$so" ]; then
    echo "bench: installing vetd and its dependencies (pip install -e, builds vetd._hotpath)" >&2
    python3 -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' ||
        apt-get install -y python3-dev >&2
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -e "$REPO" >&2
fi

mkdir -p "$BUILD"
for prog in opener reference_listener; do
    if [ ! -x "$BUILD/$prog" ] || [ "$HERE/$prog.c" -nt "$BUILD/$prog" ]; then
        gcc -O2 -Wall -Wextra -o "$BUILD/$prog" "$HERE/$prog.c"
    fi
done

# bench.py cleans up after itself; this trap covers a bench.py that was killed outright: it
# unmounts the bench tmpfs and kills the listeners/openers bench.py recorded, by pid.
STATE="$(mktemp /tmp/vetd-bench-state.XXXXXX)"
cleanup() {
    if [ -s "$STATE" ]; then
        # bench.py first, if it outlived us somehow: it must not run on while its tmpfs goes away.
        # SIGTERM lets it clean up itself; SIGKILL after 15 s.
        while read -r kind val; do
            if [ "$kind" = bench ] && [ -r "/proc/$val/cmdline" ] &&
                tr '\0' ' ' <"/proc/$val/cmdline" | grep -q 'bench\.py'; then
                kill -TERM "$val" 2>/dev/null || true
                for _ in $(seq 150); do [ -e "/proc/$val" ] || break; sleep 0.1; done
                kill -KILL "$val" 2>/dev/null || true
            fi
        done <"$STATE"
        while read -r kind val; do
            case "$kind" in
                pid)
                    if [ -r "/proc/$val/cmdline" ] &&
                        tr '\0' ' ' <"/proc/$val/cmdline" | grep -qE 'vetd|reference_listener|opener'; then
                        kill -KILL "$val" 2>/dev/null || true
                    fi ;;
            esac
        done <"$STATE"
        while read -r kind val; do
            if [ "$kind" = mount ] && mountpoint -q "$val"; then
                echo "bench: cleaning up leftover mount $val" >&2
                umount "$val" 2>/dev/null || umount -l "$val" || true
                rmdir "$val" 2>/dev/null || true
            fi
        done <"$STATE"
    fi
    rm -f "$STATE"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

rc=0
BENCH_STATE_FILE="$STATE" timeout -k 10 "$TIMEOUT" python3 "$HERE/bench.py" "$@" || rc=$?
exit "$rc"
