#!/usr/bin/env bash
# The README's test command: installs everything the tests need, then runs them all.
# System packages (Debian): chromium for the browser tests, DejaVu fonts for figure labels, and
# Fashion-MNIST (the data `d2dpm train` and the classifier build read) for the dataset reader's test.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=(chromium fonts-dejavu-core dataset-fashion-mnist)
missing=()
for package in "${apt_packages[@]}"; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then as_root=(); elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then as_root=(sudo -n); else as_root=(none); fi
  if [ "${as_root[0]:-}" = none ]; then
    echo "note: cannot install ${missing[*]} without root; the browser tests will be skipped" >&2
  else
    "${as_root[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
fi

python3 -m pip install -q -r requirements.txt -r requirements-test.txt -r requirements-eval.txt
python3 -m pytest -q -p no:cacheprovider "$@"
