#!/usr/bin/env bash
# The report tests render report.html in headless Chromium; install Debian's package if missing.
set -euo pipefail
command -v chromium >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium for the report tests (once)" >&2
  apt-get update -qq >/dev/null && apt-get install -y -qq chromium >/dev/null
else
  echo "note: chromium is missing and cannot be installed here (needs root and apt-get); the report tests will fail" >&2
fi
