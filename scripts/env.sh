#!/usr/bin/env bash
# Prints the path of a virtual environment holding requirements-lock.txt, creating it when
# missing. The environment lives outside the clone, keyed on the lock file's hash, so CI and
# repeated clones reuse one multi-GB install instead of making a new one each run.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
lock="$root/requirements-lock.txt"
key=$( (cat "$lock"; python3 --version) | sha256sum | cut -c1-16)
base="${AUTOMODEL_VENV_ROOT:-$HOME/.cache/automodel/venvs}"
venv="$base/$key"
if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.complete" ]; then
  echo "creating the environment in $venv (a few minutes, once)" >&2
  rm -rf "$venv"
  mkdir -p "$base"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip >&2
  "$venv/bin/pip" install --quiet -r "$lock" >&2
  touch "$venv/.complete"
fi
# The package itself is installed editable from whichever clone asks, so each clone tests its own code.
# The check runs from / so that the clone's own folder on sys.path cannot pass for an install.
if ! (cd / && "$venv/bin/python" -c "import automodel, pathlib, sys; sys.exit(pathlib.Path(automodel.__file__).resolve().parents[1] != pathlib.Path('$root'))" 2>/dev/null) || [ ! -x "$venv/bin/automodel" ]; then
  "$venv/bin/pip" install --quiet --no-deps --no-build-isolation -e "$root" >&2
fi
echo "$venv"
