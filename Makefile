# iobridge: the two commands a newcomer needs are `make demo` and `make test`.
PY      := .venv/bin/python
PYTEST  := .venv/bin/pytest
IOB     := .venv/bin/iobridge

.PHONY: setup demo test unit vmtest module clean help

help:
	@echo "make demo    set up, boot the VM, run the default workload and print the result"
	@echo "make test    set up, run the host unit tests and the VM tests (one pytest run)"
	@echo "make unit    host unit tests only (no root, no VM)"
	@echo "make vmtest  the kernel-facing tests only, in one VM boot"
	@echo "make module  build kmodule/ against the VM kernel's headers"
	@echo "make setup   install packages, the VM kernel and the venv (idempotent)"

setup:
	@bash scripts/setup.sh

demo: setup module
	$(IOB) vm run --timeout 900 -- bash vm/demo.sh

# pytest exits 5 when it collected no test: that is a failure here.
test: setup module
	@$(PYTEST) -v -p no:cacheprovider; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

unit: setup
	@$(PYTEST) -v -m "not vm" -p no:cacheprovider; rc=$$?; [ $$rc -ne 5 ] || rc=1; exit $$rc

vmtest: setup module
	$(IOB) vm test

# Built on the host against the VM kernel's headers; loaded only inside the VM.
module: setup
	@$(MAKE) -s -C kmodule

clean:
	-$(MAKE) -C kmodule clean
	rm -rf build *.egg-info agent/*.egg-info
