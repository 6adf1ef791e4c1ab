# Real-kernel VM tier (tests marked realkernel need ESP, which only the VM's kernel has).
# Included by the main Makefile. One VM boot runs them all; see tools/vm-run.
VM_TIMEOUT ?= 1500

.PHONY: test-vm vm-kernel
test-vm:
	tools/vm-run --timeout $(VM_TIMEOUT) -- .venv/bin/pytest -m realkernel tests

# Fetch and unpack the VM kernel ahead of time (test-vm does it on demand too).
vm-kernel:
	tools/vm-kernel
