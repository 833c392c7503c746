#!/usr/bin/env bash
# tests/run.sh - set up everything the tests need, then run them.
#
#   bash tests/run.sh            # all of it: dev tools, test bed (as root), full suite,
#                                # then the unit tests under every Python 3.9-3.13 found
#   bash tests/run.sh -k local   # extra arguments go to the main pytest run
#
# Environment:
#   LXM3_NO_TESTBED=1       do not start the Slurm/Grid Engine/SSH test bed
#   LXM3_REQUIRE_TESTBED=1  fail (not skip) tests whose test bed is missing (CI sets it)
#   LXM3_PYTHONS="3.9 3.12" which extra Pythons run the unit tests (default: 3.9-3.13)
set -Eeuo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
step() { printf '\n== %s\n' "$*"; }

step "dev tools (pytest, ruff, vermin, absl-py) for $($PYTHON --version)"
"$PYTHON" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
  pytest ruff vermin absl-py

if [[ ${LXM3_NO_TESTBED:-0} != 1 ]]; then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    step "test bed: Slurm, Grid Engine, sshd on 127.0.0.1, rsync"
    bash tests/testbed/up.sh
  else
    echo "test bed skipped: it installs packages and starts daemons, so it needs root on Debian"
  fi
fi

step "lint: ruff, and vermin for the minimum Python (3.9)"
"$PYTHON" -m ruff check .
"$PYTHON" -c "import sys, vermin; sys.exit(vermin.main())" --target=3.9- --no-tips --violations --eval-annotations lxm3.py xm

step "pytest: the whole suite on $($PYTHON --version)"
"$PYTHON" -m pytest "$@"

# The unit tests (everything that needs no test bed) under each Python.
versions=${LXM3_PYTHONS:-3.9 3.10 3.11 3.12 3.13}
root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
main_version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
for v in $versions; do
  if [[ $v == "$main_version" ]]; then
    echo "Python $v: the whole suite ran on it above; skipped"
    continue
  fi
  py=$(ls -d "$root"/versions/"$v".*/bin/python3 2>/dev/null | sort -V | tail -n 1 || true)
  if [[ -z $py ]]; then
    echo "Python $v: not installed under $root; skipped"
    continue
  fi
  step "pytest: unit tests on $("$py" --version)"
  "$py" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore pytest absl-py
  LXM3_REQUIRE_TESTBED=0 "$py" -m pytest -q -m "not testbed" -p no:cacheprovider
done
