# Every target that needs packages runs tools/setup.sh first (idempotent).
PYTEST := .venv/bin/pytest

.PHONY: setup test test-host test-vm bench clean

setup:
	bash tools/setup.sh

## make test: the whole suite: host tests (namespaces, real charon), then one VM boot for the
## tests that need a kernel with ESP.
test: setup
	$(PYTEST) tests -m "not realkernel" -q
	$(MAKE) --no-print-directory test-vm

test-host: setup
	$(PYTEST) tests -m "not realkernel" -q

-include tools/vm.mk
-include tools/install.mk
-include tools/deb.mk
## make demo: the main job (see README, tools/demo.mk)
-include tools/demo.mk

bench: setup
	@for b in bench/bench_*.py; do echo "== $$b"; .venv/bin/python $$b || exit 1; done

clean:
	rm -rf .venv .cache build *.egg-info
