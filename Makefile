# xdpguard: every target sets the machine up first (idempotent, needs root).
PY := .venv/bin/python
export PATH := $(CURDIR)/.venv/bin:$(PATH)
# make install PREFIX=/usr DESTDIR=/tmp/root: the command, man page and
# completion under PREFIX, the unit and xdpguard/ under SYSCONFDIR, all
# inside DESTDIR (a staging root: nothing is reloaded then).
PREFIX ?= /usr/local
SYSCONFDIR ?= /etc
DESTDIR ?=
MAN8DIR := $(PREFIX)/share/man/man8
# bash-completion looks in <dir>/bash-completion/completions for each dir of
# XDG_DATA_DIRS (default /usr/local/share:/usr/share) when a command is completed.
BASHCOMPDIR := $(PREFIX)/share/bash-completion/completions

.PHONY: setup demo test test-quick bench bench-quick fuzz install install-files man clean vm-smoke vm-test vm-image

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
# GUESTS=name[,name], STEPS=step[,step] and TESTS='pytest args' narrow a run (vm/README.md).
VM_ARGS = $(foreach g,$(subst $(comma), ,$(GUESTS)),--guest $(g)) $(if $(STEPS),--steps $(STEPS)) \
	$(if $(TESTS),--tests '$(TESTS)')
comma := ,

vm-smoke:
	python3 vm/run.py smoke $(VM_ARGS)

vm-test:
	python3 vm/run.py test $(VM_ARGS)

vm-image:
	for g in $$(awk '!/^#/ && NF {print $$1}' vm/guests.conf); do bash vm/image.sh $$g || exit 1; done

install: setup install-files
	@if [ -z "$(DESTDIR)" ]; then systemctl daemon-reload; command -v mandb >/dev/null && mandb -q || true; fi

# What install copies, without set-up (tests/test_manpage.py installs into a
# temporary PREFIX). The unit names the command and the policies by path.
UNIT := $(DESTDIR)$(SYSCONFDIR)/systemd/system/xdpguard@.service
install-files:
	install -d $(dir $(UNIT)) $(DESTDIR)$(SYSCONFDIR)/xdpguard $(DESTDIR)$(PREFIX)/sbin \
		$(DESTDIR)$(MAN8DIR) $(DESTDIR)$(BASHCOMPDIR)
	sed -e 's|/usr/local/sbin/xdpguard|$(PREFIX)/sbin/xdpguard|g' -e 's|/etc/xdpguard/|$(SYSCONFDIR)/xdpguard/|g' \
		systemd/xdpguard@.service > $(UNIT)
	chmod 0644 $(UNIT)
	ln -sf $(CURDIR)/.venv/bin/xdpguard $(DESTDIR)$(PREFIX)/sbin/xdpguard
	install -m 0644 docs/xdpguard.8 $(DESTDIR)$(MAN8DIR)/xdpguard.8
	$(PY) -m xdpguard.cli completion bash > $(DESTDIR)$(BASHCOMPDIR)/xdpguard.tmp
	mv $(DESTDIR)$(BASHCOMPDIR)/xdpguard.tmp $(DESTDIR)$(BASHCOMPDIR)/xdpguard

# docs/xdpguard.8 from docs/xdpguard.8.md (pandoc); commit both.
man:
	@bash scripts/manpage.sh

clean:
	rm -rf .venv *.egg-info .pytest_cache .hypothesis
