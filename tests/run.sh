#!/usr/bin/env bash
# tests/run.sh - set up everything the tests need, then run them.
#
#   bash tests/run.sh            # all of it: dev tools, test bed (as root), lint, full
#                                # suite, the unit tests under every Python 3.9-3.13
#                                # found, and the guest check of the test bed (as root)
#   bash tests/run.sh -k local   # extra arguments go to the main pytest run
#
# Every phase runs even when an earlier one failed; the end lists each phase
# with PASS, FAIL or SKIP, and the exit status is 1 if any failed.
#
# Environment:
#   LXM3_NO_TESTBED=1       do not start the Slurm/Grid Engine/OpenPBS/SSH test bed, nor run its guest check
#   LXM3_REQUIRE_TESTBED=1  fail (not skip) tests whose test bed is missing (CI sets it)
#   LXM3_PYTHONS="3.9 3.12" which extra Pythons run the unit tests (default: 3.9-3.13)
set -Euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
PYTHON=${PYTHON:-python3}

SUMMARY=()
FAILED=0
# Each phase's output is kept, so that the summary at the end can repeat the
# tests that failed in every phase (a CI log often shows only its end).
PHASE_LOGS=$(mktemp -d "${TMPDIR:-/tmp}/lxm3-run.XXXXXX")
trap 'rm -rf "$PHASE_LOGS"' EXIT
step() { printf '\n== %s\n' "$*"; }
# phase NAME COMMAND...: run it, and note how it went and how long it took.
phase() {
  local name=$1 start=$SECONDS rc=0 log
  shift
  step "$name"
  log=$PHASE_LOGS/${#SUMMARY[@]}.log
  if [[ $name == pytest* ]]; then  # (not the test bed's phases: daemons would hold tee's pipe)
    "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
  else
    "$@" || rc=$?
  fi
  if ((rc == 0)); then
    SUMMARY+=("PASS  $name ($((SECONDS - start)) s)")
  else
    SUMMARY+=("FAIL  $name (exit $rc, $((SECONDS - start)) s)")
    while IFS= read -r line; do SUMMARY+=("        $line"); done < <(
      grep -E '^(FAILED|ERROR) ' "$log" 2>/dev/null | cut -c1-200 | head -n 12)
    FAILED=1
  fi
}
skip() { SUMMARY+=("SKIP  $1: $2"); printf '\n== %s: skipped, %s\n' "$1" "$2"; }

testbed_here=0
if [[ ${LXM3_NO_TESTBED:-0} == 1 ]]; then
  testbed_why="LXM3_NO_TESTBED=1"
elif [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null; then
  testbed_why="it installs packages and starts daemons, so it needs root on Debian"
else
  testbed_here=1
fi

phase "dev tools (pytest, ruff, vermin, absl-py) for $($PYTHON --version 2>&1)" \
  "$PYTHON" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
  pytest ruff vermin absl-py

if ((testbed_here)); then
  phase "test bed: its own Slurm, Grid Engine and sshd on 127.0.0.1, rsync, OpenPBS in a network namespace" bash tests/testbed/up.sh
else
  skip "test bed" "$testbed_why"
fi

phase "lint: ruff" "$PYTHON" -m ruff check .
phase "lint: vermin for the minimum Python (3.9)" \
  "$PYTHON" -c "import sys, vermin; sys.exit(vermin.main())" --target=3.9- --no-tips --violations \
  --eval-annotations lxm3.py xm

phase "pytest: the whole suite on $($PYTHON --version 2>&1)" "$PYTHON" -m pytest "$@"

# The unit tests (everything that needs no test bed) under each Python.
unit_tests() {
  "$1" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore pytest absl-py &&
    LXM3_REQUIRE_TESTBED=0 "$1" -m pytest -q -m "not testbed" -p no:cacheprovider
}
versions=${LXM3_PYTHONS:-3.9 3.10 3.11 3.12 3.13}
root=$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")
main_version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
for v in $versions; do
  if [[ $v == "$main_version" ]]; then
    skip "pytest: unit tests on Python $v" "the whole suite ran on it above"
    continue
  fi
  # shellcheck disable=SC2012  # version directories have plain names
  py=$(ls -d "$root"/versions/"$v".*/bin/python3 2>/dev/null | sort -V | tail -n 1 || true)
  if [[ -z $py ]]; then
    skip "pytest: unit tests on Python $v" "not installed under $root"
    continue
  fi
  phase "pytest: unit tests on $("$py" --version 2>&1)" unit_tests "$py"
done

# Last, since it takes the test bed down and up again: bringing the test bed
# up and down beside a site's Slurm, Grid Engine, sshd and PBS leaves them as they were.
if ((testbed_here)); then
  phase "guest check: the test bed leaves the machine's own Slurm, Grid Engine, sshd and PBS alone" \
    bash tests/testbed/guest-check.sh
else
  skip "guest check" "$testbed_why"
fi

step "summary"
printf '  %s\n' "${SUMMARY[@]}"
if ((FAILED)); then
  echo "tests/run.sh: FAILED"
  exit 1
fi
echo "tests/run.sh: all phases passed"
