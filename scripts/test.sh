#!/usr/bin/env bash
# Install everything vetd's test suite needs (Debian packages, Python packages), then run it all.
# Kernel tests need root; under CI=true a kernel test that cannot run fails instead of skipping.
set -euo pipefail
cd "$(dirname "$0")/.."
# vetd refuses plugin code that group or others may write (it runs as root inside the daemon):
# keep this checkout's code, and the plugins the tests create, out of that class whatever the
# umask of the clone was.
umask 022
chmod -R go-w vetd plugins
export DEBIAN_FRONTEND=noninteractive
# python3: the system Python, which the tests run as an unprivileged user (root's may be unreadable)
# gcc, libc6-dev, python3-dev: the C agent example and vetd._hotpath, the compiled read loop
debs=(e2fsprogs util-linux mount systemd gcc libc6-dev python3-dev clamav-daemon python3)
missing=()
for p in "${debs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    # No service may start from a package's postinst (clamav-freshclam would go to the network):
    # the tests start their own clamd with signatures they generate.
    made_policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
    if [ -n "$made_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi
fi
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -e '.[test]'
exec python3 -m pytest -ra "$@"
