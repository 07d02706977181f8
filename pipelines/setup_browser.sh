#!/usr/bin/env bash
# Installs Debian's headless-capable `chromium` for the feature-browser tests
# (tests/test_features_browser.py opens the generated site in it). Idempotent: does nothing when
# chromium is already on PATH. Needs root (or sudo) and the Debian package mirrors; no browser
# download from anywhere else.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  echo "setup_browser: $(chromium --version 2>/dev/null || echo chromium) already installed"
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO=sudo
fi
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends chromium
echo "setup_browser: $(chromium --version 2>/dev/null || echo chromium) installed"
