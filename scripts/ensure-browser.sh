#!/usr/bin/env bash
# Make sure a Chromium is installed for the web page test: Playwright drives Debian's package,
# since Playwright's own browser downloads cannot be fetched on these machines.
set -euo pipefail

if command -v chromium >/dev/null; then
  echo "ensure-browser: $(chromium --version 2>/dev/null || echo chromium) is installed"
  exit 0
fi

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else echo "ensure-browser: installing chromium needs root or sudo" >&2; return 1
  fi
}

echo "ensure-browser: installing chromium with apt"
as_root apt-get update -qq
DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq chromium >/dev/null
command -v chromium >/dev/null || { echo "ensure-browser: chromium is still missing after apt-get" >&2; exit 1; }
echo "ensure-browser: $(chromium --version 2>/dev/null || echo chromium) is installed"
