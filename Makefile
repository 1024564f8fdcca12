# xdpguard: every target sets the machine up first (idempotent, needs root).
PY := .venv/bin/python
export PATH := $(CURDIR)/.venv/bin:$(PATH)

.PHONY: setup demo test test-quick bench bench-quick fuzz install clean vm-smoke vm-test vm-image

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests

test-quick: setup
	$(PY) -m pytest -q -p no:cacheprovider -m "not e2e" tests

bench: setup
	$(PY) bench/run.py

bench-quick: setup
	$(PY) bench/run.py --quick

fuzz: setup
	XG_FUZZ_FRAMES=1000000 $(PY) -m pytest -q -p no:cacheprovider tests/test_fuzz.py

# Debian guests under QEMU (vm/README.md): images are built and cached in
# /var/cache/xdpguard-vm; results in vm/results/.
vm-smoke:
	python3 vm/run.py smoke

vm-test:
	python3 vm/run.py test

vm-image:
	for g in $$(awk '!/^#/ && NF {print $$1}' vm/guests.conf); do bash vm/image.sh $$g || exit 1; done

install: setup
	install -D -m 0644 systemd/xdpguard@.service /etc/systemd/system/xdpguard@.service
	install -d /etc/xdpguard
	ln -sf $(CURDIR)/.venv/bin/xdpguard /usr/local/sbin/xdpguard
	systemctl daemon-reload

clean:
	rm -rf .venv *.egg-info .pytest_cache .hypothesis
