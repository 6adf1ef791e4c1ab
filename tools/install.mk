# `make install`: ipsec-supervisor in a virtual environment, its systemd unit, the default
# configuration and the strongSwan snippet (tools/install.sh has the details).  Included by
# the main Makefile; also works alone: make -f tools/install.mk install DESTDIR=/tmp/stage
#
#   make install                        /opt/ipsec-supervisor, /usr/local/sbin/ipsec-supervisor
#   make install IPSEC_LINK=yes         also /usr/local/sbin/ipsec (shadows Debian's /usr/sbin/ipsec)
#   make install IPSEC_DIVERT=yes       /usr/sbin/ipsec becomes ours (strongSwan's: ipsec.strongswan)
#   make uninstall                      removes it (configuration kept), undoes IPSEC_DIVERT
#   make install DESTDIR=/tmp/stage     staged, for packaging
INSTALL_SH := $(dir $(lastword $(MAKEFILE_LIST)))install.sh
INSTALL_VARS := DESTDIR PREFIX BINDIR IPSEC_LINK IPSEC_DIVERT UNITDIR CONFDIR STRONGSWAN_CONFDIR DOCDIR \
                INSTALL_PYTHON PIP_ARGS INSTALL_FROM

.PHONY: install uninstall
install:
	$(foreach v,$(INSTALL_VARS),$(if $(filter-out undefined,$(origin $(v))),$(v)='$($(v))')) \
	  bash $(INSTALL_SH)

uninstall:
	$(foreach v,$(INSTALL_VARS),$(if $(filter-out undefined,$(origin $(v))),$(v)='$($(v))')) \
	  bash $(INSTALL_SH) uninstall
