#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian 12 machine (run as root):
# Debian packages, then a virtual environment in .venv with the project installed.
set -euo pipefail
cd "$(dirname "$0")/.."

DEB_PACKAGES=(
  # kernel-state layer and tests
  iproute2 iptables nftables kmod strace tcpdump iputils-ping
  # systemd-python builds from source
  libsystemd-dev pkg-config gcc python3-dev python3-venv
  # real strongSwan for the integration tests and the demo
  strongswan-charon strongswan-starter strongswan-swanctl charon-systemd
  libstrongswan-standard-plugins
  # the real-kernel VM tier (a Debian kernel with ESP, booted by virtme-ng)
  qemu-system-x86 busybox-static
  # the real-systemd tier
  systemd-container
  # real clients of `ipsec`: Open vSwitch's IPsec monitor (tests/test_real_clients.py)
  openvswitch-switch openvswitch-ipsec
  # the metrics tests: a real Prometheus server scraping the supervisor, promtool for the alert rules
  prometheus
  # `make deb`'s checks (lintian) and what the .deb depends on, for dpkg -i in the container tier
  lintian python3-psutil python3-systemd python3-yaml python3-prometheus-client
)

missing=()
for p in "${DEB_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  apt-get update -q
  # Packages such as openvswitch-switch start their daemons from postinst; on this machine
  # nothing of theirs may run (tests start their own, in namespaces): deny service starts
  # during the install unless the machine already has a policy.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  # --no-install-recommends: systemd-container recommends libnss-mymachines, which edits nsswitch.conf
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [ ! -e "$stamp" ]; then
  echo "setup: installing the project and its Python dependencies into .venv"
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test,fast]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi

# OpenStack neutron-vpnaas (PyPI) for tests/test_real_clients.py: its real strongSwan driver,
# netns wrapper and rootwrap, in a virtual environment of its own (its dependency tree pins
# versions of its own and must not mix with ours).
NEUTRON_VPNAAS=neutron-vpnaas==29.0.0
if [ ! -e .cache/neutron-venv/.installed-$NEUTRON_VPNAAS ]; then
  echo "setup: installing $NEUTRON_VPNAAS into .cache/neutron-venv"
  rm -rf .cache/neutron-venv
  "$PY" -m venv .cache/neutron-venv
  .cache/neutron-venv/bin/pip install -q --disable-pip-version-check "$NEUTRON_VPNAAS"
  touch ".cache/neutron-venv/.installed-$NEUTRON_VPNAAS"
fi
