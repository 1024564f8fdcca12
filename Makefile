# xdpguard: every target sets the machine up first (idempotent, needs root).
PY := .venv/bin/python
export PATH := $(CURDIR)/.venv/bin:$(PATH)

.PHONY: setup demo test test-quick bench bench-quick fuzz install clean

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

install: setup
	install -D -m 0644 systemd/xdpguard@.service /etc/systemd/system/xdpguard@.service
	install -d /etc/xdpguard
	ln -sf $(CURDIR)/.venv/bin/xdpguard /usr/local/sbin/xdpguard
	systemctl daemon-reload

clean:
	rm -rf .venv *.egg-info .pytest_cache .hypothesis
