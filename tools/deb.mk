# `make deb`: build/ipsec-supervisor_VERSION_all.deb (tools/deb/build.sh has the details).
#   make deb DEB_VERSION=0.1.0+git1   another package version (upgrades need a higher one)
.PHONY: deb
deb: setup
	$(if $(DEB_VERSION),DEB_VERSION='$(DEB_VERSION)') bash tools/deb/build.sh
