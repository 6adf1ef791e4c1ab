# make demo: the two-namespace lab (moon under ipsec-supervisor, sun), kill -9 of moon's charon,
# and the recovery report; see lab/demo.py.  Included by the main Makefile.
# Runs in the real-kernel VM (tools/vm-run) by itself when this machine's kernel has no ESP.
#   make demo                      recovery.mode adopt (the default)
#   make demo DEMO_MODE=flush      or keep
DEMO_MODE ?= adopt
DEMO_ARGS ?=
# Tools the lab needs that tools/setup.sh may not install (iputils-ping is not in every image).
DEMO_DEB_PACKAGES := iputils-ping tcpdump

.PHONY: demo demo-packages
demo: setup demo-packages
	.venv/bin/python -m lab.demo --mode $(DEMO_MODE) $(DEMO_ARGS)

demo-packages:
	@missing=; for p in $(DEMO_DEB_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "demo: installing Debian packages:$$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi
