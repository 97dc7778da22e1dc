#!/usr/bin/env bash
# Install vetd (the package, /etc/vetd, the systemd unit) and run it in the foreground on the
# shipped default configuration. Ctrl-C stops it; the kernel then lets every open through.
set -euo pipefail
cd "$(dirname "$0")/.."
umask 022  # installed plugin files must not be group/world-writable: vetd refuses those
if [ "$(id -u)" -ne 0 ]; then echo "install-and-run: run as root (vetd holds fanotify events)" >&2; exit 1; fi
# A C compiler and Python's headers build vetd._hotpath, the compiled read loop; without them
# vetd still runs, on its pure-Python loop (slower warm answers; vetctl status says which).
if ! command -v gcc >/dev/null 2>&1 || ! python3 -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
    if command -v apt-get >/dev/null 2>&1; then
        { apt-get update -qq >&2 &&
          DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gcc libc6-dev python3-dev >&2; } ||
            echo "install-and-run: could not install gcc/python3-dev: vetd runs its pure-Python loop" >&2
    fi
fi
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore .
bindir=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
for cmd in vetd vetctl; do
    [ -e "/usr/local/bin/$cmd" ] || ln -s "$bindir/$cmd" "/usr/local/bin/$cmd"
done
install -d -m 0755 /etc/vetd /etc/vetd/hashes.d
[ -e /etc/vetd/vetd.toml ] || install -m 0644 conf/vetd.toml /etc/vetd/vetd.toml
[ -e /etc/vetd/hashes.d/deny.sha256 ] || install -m 0644 conf/hashes.d/deny.sha256 /etc/vetd/hashes.d/
install -d -m 0755 /etc/vetd/rules.d
[ -e /etc/vetd/rules.d/00-example.rules ] || install -m 0644 conf/rules.d/00-example.rules /etc/vetd/rules.d/
install -d -m 0755 /etc/vetd/yara
[ -e /etc/vetd/yara/eicar.yar ] || install -m 0644 conf/yara/eicar.yar /etc/vetd/yara/
install -m 0644 systemd/vetd.service /etc/systemd/system/vetd.service
/usr/local/bin/vetd --check-config --config /etc/vetd/vetd.toml
exec /usr/local/bin/vetd --config /etc/vetd/vetd.toml "$@"
