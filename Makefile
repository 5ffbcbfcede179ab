# iobridge: the two commands a newcomer needs are `make demo` and `make test`.
PY      := .venv/bin/python
PYTEST  := .venv/bin/pytest
IOB     := .venv/bin/iobridge

.PHONY: setup demo test unit vmtest module clean help

help:
	@echo "make demo    set up, boot the VM, run the default workload and print the result"
	@echo "make test    set up, run the host unit tests and the VM tests on Debian 12's"
	@echo "             6.1 and 6.12 (one pytest run; KERNELS='RELEASE ...' chooses)"
	@echo "make unit    host unit tests only (no root, no VM)"
	@echo "make vmtest  the kernel-facing tests only, one VM boot per kernel (KERNELS= as above)"
	@echo "make module  build kmodule/ against each VM kernel's headers"
	@echo "make setup   install packages, the VM kernels and the venv (idempotent)"
	@echo "make demo    on the default kernel (6.1); KERNEL=RELEASE for another"

setup:
	@bash scripts/setup.sh

demo: setup module
	$(IOB) vm run --timeout 900 $(if $(KERNEL),--kernel $(KERNEL)) -- bash vm/demo.sh

# pytest exits 5 when it collected no test: that is a failure here.
# The VM tests run on every kernel in vm/kernel-release (6.1 and 6.12), one
# VM boot each, the boots side by side (one per host CPU;
# IOBRIDGE_VM_PARALLEL=1: one after the other), or on each release in
# KERNELS (tests/conftest.py).
test: setup module
	@IOBRIDGE_KERNELS="$(KERNELS)" $(PYTEST) -v -p no:cacheprovider; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

unit: setup
	@$(PYTEST) -v -m "not vm" -p no:cacheprovider; rc=$$?; [ $$rc -ne 5 ] || rc=1; exit $$rc

vmtest: setup module
	@IOBRIDGE_KERNELS="$(KERNELS)" $(PYTEST) -v -m vm -p no:cacheprovider; rc=$$?; \
	[ $$rc -ne 5 ] || rc=1; exit $$rc

# Built on the host against each VM kernel's headers (kmodule/build/RELEASE/);
# loaded only inside the VM.
module: setup
	@$(MAKE) -s -C kmodule

clean:
	-$(MAKE) -C kmodule clean
	rm -rf build *.egg-info agent/*.egg-info
