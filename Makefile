# pbmd: `make run` sets up and runs the main job, `make test` sets up and runs the checks.
# Both create .venv and install the Debian packages pbmd needs when they are missing.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SYSTEM_PACKAGES := mosquitto minisign socat libusb-1.0-0 chromium chromium-driver systemd libseccomp2
PACKAGES := pbmd.daemon pbmd.drivers pbmd.protocols pbmd.hw_sim

.PHONY: run test setup system-deps dashboard lint typecheck pytest bench clean

# The demo's device clock runs ×30 (its default; why: DEFAULT_TIME_SCALE in daemon/clients/demo.py).
run: setup
	$(BIN)/pbmd demo

test: setup lint typecheck pytest

setup: system-deps $(STAMP) dashboard

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

# Debian packages: mosquitto (MQTT tests), minisign (protocol signatures), socat, libusb,
# chromium and chromium-driver (the dashboard's browser test).
system-deps:
	@missing=""; \
	for p in $(SYSTEM_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then sudo=""; else sudo=sudo; fi; \
	  $$sudo apt-get -o DPkg::Lock::Timeout=300 update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# The clinic dashboard page (dashboard/): `npm ci` from the lock file, then an esbuild
# bundle in dashboard/dist/. Without Node.js it is skipped (and so is its browser test).
DASHBOARD_INPUTS := $(wildcard dashboard/src/*) dashboard/build.mjs dashboard/package.json

dashboard:
	@if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then \
	  $(MAKE) --no-print-directory dashboard/dist/app.js; \
	else \
	  echo "dashboard: Node.js (node, npm) not found: the page is not built and its browser test is skipped"; \
	fi

dashboard/node_modules/.package-lock.json: dashboard/package-lock.json dashboard/package.json
	cd dashboard && npm ci --no-audit --no-fund --loglevel=error

dashboard/dist/app.js: dashboard/node_modules/.package-lock.json $(DASHBOARD_INPUTS)
	cd dashboard && npm run --silent build

lint: setup
	$(BIN)/ruff check .

# mypy resolves `pbmd.*` through a tree of links, since the sub-packages live in
# top-level folders that only setuptools maps into the namespace.
typecheck: setup
	@mkdir -p .typecheck/pbmd
	@for d in daemon drivers protocols hw_sim; do ln -sfn ../../$$d .typecheck/pbmd/$$d; done
	MYPYPATH=.typecheck $(BIN)/mypy $(addprefix -p ,$(PACKAGES))

# Most of the suite waits on time-scaled device clocks, not on the CPU (about 40 %
# of one core), so two workers halve the wall time; whole files stay on one worker
# so module fixtures (a shared daemon, a broker) are started once.
PYTEST_WORKERS ?= 2

# The engine tests run the safety core inside pytest's own processes. Like the
# deployed daemon (systemd/pbmd.service: SCHED_FIFO, Nice=-10 where that is refused)
# they run at Nice -10 where allowed (root, as in CI), so that other work on the
# machine does not stand in for a failing controller.
PYTEST_NICE := $(shell [ "$$(id -u)" = 0 ] && echo "nice -n -10")

pytest: setup
	$(PYTEST_NICE) $(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile

# Every benchmark with its short defaults (benchlib.py and sim_tap.py are their parts);
# all run, and the target fails at the end if one failed (spurious_stops.py is a check).
bench: setup
	@rc=0; for f in bench/*.py; do \
	  case $$f in */benchlib.py|*/sim_tap.py) continue;; esac; \
	  echo "== $$f"; $(BIN)/python $$f || rc=1; \
	done; exit $$rc

clean:
	rm -rf $(VENV) .typecheck .pytest_cache .mypy_cache .ruff_cache .hypothesis build *.egg-info
	rm -rf dashboard/node_modules dashboard/dist test-artifacts
