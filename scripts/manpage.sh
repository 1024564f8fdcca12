#!/bin/sh
# The man page docs/xdpguard.8 from its source docs/xdpguard.8.md, with
# pandoc (Debian's package; scripts/setup.sh installs it). The page is
# committed, so that `make install` needs no pandoc; `make man` remakes it
# and tests/test_manpage.py fails while it is older than its source.
#
#   scripts/manpage.sh [OUT]     OUT defaults to docs/xdpguard.8
set -eu
cd "$(dirname "$0")/.."
command -v pandoc >/dev/null || { echo "manpage.sh: pandoc is not installed (apt-get install pandoc)" >&2; exit 1; }
exec pandoc --standalone --from markdown --to man --output "${1:-docs/xdpguard.8}" docs/xdpguard.8.md
