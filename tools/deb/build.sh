#!/usr/bin/env bash
# `make deb`: build/ipsec-supervisor_VERSION_all.deb from this checkout, with a plain
# `dpkg-deb --build` of a staged tree (no debhelper: the package is a venv plus a few files).
#
# What goes where (see README "Install"):
#   /usr/lib/ipsec-supervisor          a venv on Debian's /usr/bin/python3 that sees Debian's
#                                      python3-psutil, -systemd, -yaml and -prometheus-client
#                                      (--system-site-packages)
#                                      and holds this checkout plus the dependencies Debian lacks
#   /usr/sbin/ipsec, ipsec-supervisor  symlinks into it; /usr/sbin/ipsec is diverted (preinst)
#   /lib/systemd/system/ipsec-supervisor.service   etc/ipsec-supervisor.service, paths rewritten
#   /etc/ipsec-supervisor/supervisor.yaml, /etc/strongswan.d/ipsec-supervisor.conf  conffiles
#
# Why not bundle everything: psutil and systemd-python are C extensions; Debian's builds get
# security updates, need no compiler here and keep the package Architecture: all (Debian's
# prometheus-client, 0.16, is pure Python but a Debian package like the others).  pyroute2
# (Debian 12 has 0.7.2, the code needs the 0.9 API) and vici (not in Debian) are pure Python
# and bundled at the exact versions the test suite ran with (.venv).
#
# Settings: DEB_VERSION (default: pyproject's version), DEB_MAINTAINER, OUT (default build/).
set -euo pipefail

SRC=$(cd "$(dirname "$0")/../.." && pwd)
HERE=$SRC/tools/deb
OUT=${OUT:-$SRC/build}
DEV_PYTHON=${DEV_PYTHON:-$SRC/.venv/bin/python}     # runs pip; its site-packages pin the versions
PYTHON=/usr/bin/python3                             # Debian's: the one the package runs on
PREFIX=/usr/lib/ipsec-supervisor
DEB_MAINTAINER=${DEB_MAINTAINER:-ipsec-supervisor maintainers <ipsec-supervisor@localhost>}

die() { echo "deb: $*" >&2; exit 1; }
[ -x "$DEV_PYTHON" ] || die "no $DEV_PYTHON: run 'make setup' first"
[ -x "$PYTHON" ] || die "no $PYTHON (Debian: apt-get install python3 python3-venv)"
command -v dpkg-deb >/dev/null || die "no dpkg-deb: the .deb is built on Debian"

# Project metadata: version, dependencies split into Debian's and bundled, console scripts.
meta=$("$DEV_PYTHON" - "$SRC/pyproject.toml" <<'PY'
import re, shlex, sys, tomllib
from importlib.metadata import version
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
# PyPI name -> Debian package that provides it (Debian 12 versions meet pyproject's minimums).
DEBIAN = {"psutil": "python3-psutil", "systemd-python": "python3-systemd", "pyyaml": "python3-yaml",
          "prometheus_client": "python3-prometheus-client", "prometheus-client": "python3-prometheus-client"}
depends, bundled = [], []
for req in project["dependencies"]:
    m = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*(?:>=\s*([0-9.]+))?", req.strip())
    if not m:
        sys.exit(f"deb: cannot translate the dependency {req!r} of pyproject.toml")
    name, minimum = m.group(1), m.group(2)
    if name.lower() in DEBIAN:
        depends.append(DEBIAN[name.lower()] + (f" (>= {minimum})" if minimum else ""))
    else:
        bundled.append(f"{name}=={version(name)}")
print(f"VERSION={shlex.quote(project['version'])}")
print(f"PY_DEPENDS={shlex.quote(', '.join(depends))}")
print(f"BUNDLED=({' '.join(shlex.quote(b) for b in bundled)})")
print(f"SCRIPTS=({' '.join(shlex.quote(f'{k}={v}') for k, v in project['scripts'].items())})")
PY
) || die "cannot read pyproject.toml's metadata (above)"
eval "$meta"
DEB_VERSION=${DEB_VERSION:-$VERSION}
PYVER=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
PYNEXT=$("$PYTHON" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1] + 1}")')
# The venv's site-packages is lib/pythonX.Y: another Python minor version would not see it.
DEPENDS="python3 (>= $PYVER), python3 (<< $PYNEXT), $PY_DEPENDS, strongswan-charon, strongswan-swanctl"

STAGE=$OUT/deb/root
rm -rf "$OUT/deb"
mkdir -p "$STAGE/DEBIAN" "$OUT"
umask 022
VENV=$STAGE$PREFIX
SITE=$VENV/lib/python$PYVER/site-packages

# 1. The venv and what goes into it.
"$PYTHON" -m venv --without-pip --system-site-packages --symlinks "$VENV"
rm -f "$VENV"/bin/activate* "$VENV"/bin/Activate.ps1
rm -rf "$VENV/include"                           # empty: nothing here compiles against it
[ -L "$VENV/lib64" ] && rm "$VENV/lib64"        # a convenience link, unused
ln -sfn ../../../bin/python3 "$VENV/bin/python3"   # relative: /usr/bin/python3 (Debian's)
# pyvenv.cfg names the staging directory in `command`: write it for the installed place.
printf 'home = /usr/bin\ninclude-system-site-packages = true\nversion = %s\n' \
  "$("$PYTHON" -c 'import platform; print(platform.python_version())')" > "$VENV/pyvenv.cfg"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/src"          # a clean copy: building in place leaves build/ and *.egg-info
cp -r "$SRC/pyproject.toml" "$SRC/README.md" "$SRC/supervisor" "$work/src/"
find "$work/src" -name __pycache__ -prune -exec rm -rf {} +
echo "deb: bundling ${BUNDLED[*]} and ipsec-supervisor $VERSION into $PREFIX"
"$DEV_PYTHON" -m pip install -q --disable-pip-version-check --no-deps --no-compile --target "$SITE" \
  "$work/src" "${BUNDLED[@]}"
rm -rf "$SITE/bin"                              # pip's scripts name the build's interpreter
find "$SITE" -name __pycache__ -prune -exec rm -rf {} +   # postinst byte-compiles
find "$SITE" -name 'direct_url.json' -delete    # names the temporary build directory
if find "$SITE" -name '*.so' | grep -q .; then
  die "a bundled dependency has compiled code: Architecture: all would be wrong ($(find "$SITE" -name '*.so' | head -3))"
fi
for s in "${SCRIPTS[@]}"; do       # NAME=module:function, as pip would write them
  name=${s%%=*} target=${s#*=}
  cat > "$VENV/bin/$name" <<SCRIPT
#!$PREFIX/bin/python3
# $name of the ipsec-supervisor package ($target).
import sys
from ${target%%:*} import ${target#*:}
sys.exit(${target#*:}())
SCRIPT
  chmod 0755 "$VENV/bin/$name"
done

# 2. Commands: /usr/sbin/ipsec is ours; strongSwan's moves to ipsec.strongswan (preinst).
mkdir -p "$STAGE/usr/sbin"
ln -s "../lib/ipsec-supervisor/bin/ipsec" "$STAGE/usr/sbin/ipsec"
ln -s "../lib/ipsec-supervisor/bin/ipsec-supervisor" "$STAGE/usr/sbin/ipsec-supervisor"

# 3. The unit: the repository's, with the package's paths (its other lines flow in unchanged).
mkdir -p "$STAGE/lib/systemd/system"
sed -e "s#/usr/local/bin/ipsec-supervisor#$PREFIX/bin/ipsec-supervisor#g" \
    -e "s#/usr/local/share/doc/ipsec-supervisor#/usr/share/doc/ipsec-supervisor#g" \
    "$SRC/etc/ipsec-supervisor.service" > "$STAGE/lib/systemd/system/ipsec-supervisor.service"
grep -q "^ExecStart=$PREFIX/bin/ipsec-supervisor " "$STAGE/lib/systemd/system/ipsec-supervisor.service" \
  || die "etc/ipsec-supervisor.service has no ExecStart=/usr/local/bin/ipsec-supervisor to rewrite"

# 4. Configuration (conffiles: dpkg asks before replacing a changed one).
install -D -m 0644 "$SRC/etc/supervisor.yaml" "$STAGE/etc/ipsec-supervisor/supervisor.yaml"
install -D -m 0644 "$SRC/etc/strongswan.d/ipsec-supervisor.conf" "$STAGE/etc/strongswan.d/ipsec-supervisor.conf"
printf '%s\n' /etc/ipsec-supervisor/supervisor.yaml /etc/strongswan.d/ipsec-supervisor.conf \
  > "$STAGE/DEBIAN/conffiles"

# 5. Documentation (README uncompressed: the unit's Documentation= names it), lintian overrides.
DOC=$STAGE/usr/share/doc/ipsec-supervisor
install -D -m 0644 "$SRC/README.md" "$DOC/README.md"
install -m 0644 "$HERE/copyright" "$DOC/copyright"
for dropin in "$SRC"/etc/ipsec-supervisor.service.d/*.conf; do   # optional drop-ins, to copy by hand
  [ ! -e "$dropin" ] || install -m 0644 "$dropin" "$DOC/"
done
install -m 0644 "$SRC/etc/prometheus/ipsec-supervisor-rules.yml" "$DOC/"   # for the Prometheus server
{
  echo "ipsec-supervisor ($DEB_VERSION) unstable; urgency=medium"
  echo
  echo "  * Built from the ipsec-supervisor repository ($(git -C "$SRC" rev-parse --short HEAD 2>/dev/null || echo unknown))."
  echo
  echo " -- $DEB_MAINTAINER  $(date -R -d "@${SOURCE_DATE_EPOCH:-$(git -C "$SRC" log -1 --format=%ct 2>/dev/null || date +%s)}")"
} | gzip -9n > "$DOC/changelog.gz"
install -D -m 0644 "$HERE/lintian-overrides" "$STAGE/usr/share/lintian/overrides/ipsec-supervisor"

# 6. Maintainer scripts and control.
for f in preinst postinst prerm postrm; do
  install -m 0755 "$HERE/$f" "$STAGE/DEBIAN/$f"
done
cat > "$STAGE/DEBIAN/control" <<CONTROL
Package: ipsec-supervisor
Version: $DEB_VERSION
Architecture: all
Maintainer: $DEB_MAINTAINER
Installed-Size: $(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)
Depends: $DEPENDS
Recommends: strongswan-starter, iproute2, nftables | iptables
Section: net
Priority: optional
Description: crash-recovery supervisor for strongSwan's charon
 ipsec-supervisor replaces strongSwan's starter: it runs charon, and when charon
 dies it snapshots the kernel state charon left (XFRM SAs and policies, routes,
 rules, virtual IPs) and adopts or flushes it fail-closed before restarting it.
 .
 The package diverts /usr/sbin/ipsec to /usr/sbin/ipsec.strongswan, so every
 caller of ipsec (also by absolute path) gets ipsec-supervisor's command, and
 ships ipsec-supervisor.service, which conflicts with strongswan-starter.service
 and strongswan.service.
CONTROL

(cd "$STAGE" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) \
  > "$STAGE/DEBIAN/md5sums"

DEB=$OUT/ipsec-supervisor_${DEB_VERSION}_all.deb
dpkg-deb --root-owner-group -Zxz --build "$STAGE" "$DEB" >/dev/null
echo "deb: $DEB ($(du -h "$DEB" | cut -f1)); Depends: $DEPENDS"
