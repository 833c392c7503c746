#!/usr/bin/env bash
# guest-check.sh - the test bed is a guest: bringing it up, running jobs on it
# and taking it down leaves the machine's own ("site") Slurm, munge, Grid
# Engine, sshd and PBS exactly as they were: the same configuration files and
# settings, the same daemons (pid and start time), all still answering.
#
#   1. site.sh up: a site in the standard places, if the machine has none
#      running (one that runs already is used as it is, and left alone);
#   2. a snapshot of the site: sha256, owner and mode of /etc/slurm/*,
#      /etc/munge/*, /etc/ssh/sshd_config*, /etc/ssh/ssh_host_*,
#      /etc/ssh/ssh_known_hosts, /etc/default/gridengine, /etc/profile.d/*,
#      /etc/hosts, /etc/services, /etc/pbs.conf and the site cell's common/ files (not its
#      accounting log, which the site's own jobs append to); `qconf -sconf`,
#      `-ssconf`, `-sq all.q` and `scontrol show config` (but its clock and
#      job counter) as the site answers them; every munged, slurmctld, slurmd, sge_qmaster, sge_execd, sshd,
#      pbs_server.bin, pbs_sched, pbs_comm and pbs_mom daemon with its pid
#      and start time (the test bed's own excepted);
#   3. the test bed: down.sh --purge (GUEST_CHECK_COLD=0: down.sh), up.sh from
#      cold, an sbatch and a qsub job through its sshd and a PBS job through
#      its PBS sshd (where network namespaces are permitted), up.sh again (which
#      must keep its daemons' pids), down.sh;
#   4. the snapshot again, compared; sinfo, qstat and port 22 of the site
#      must still answer (and nothing of PBS's namespace remains);
#   5. site.sh down: stops only what step 1 started; the test bed is brought
#      up again if it was up before.
# Prints PASS, or FAIL with every file, setting or daemon that changed, and
# exits 0 or 1. Run as root after up.sh has installed the packages (tests/run.sh
# runs it last). The test bed's settings (TESTBED_*) apply as for up.sh.
set -Euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TB_NAME=guest-check
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"
# shellcheck source-path=SCRIPTDIR source=pbs.sh
. "$HERE/pbs.sh"
require_root

COLD=${GUEST_CHECK_COLD:-1}
WORK=$(mktemp -d /tmp/lxm3-guest-check.XXXXXX)
trap '[[ -n ${GUEST_CHECK_KEEP:-} ]] || rm -rf "$WORK"' EXIT
T0=$(now)
FAILURES=()
fail() { FAILURES+=("$*"); log "FAIL: $*"; }

# The site's commands: without the variables lib.sh exports for the test bed,
# the schedulers' commands find the site's clusters in the standard places.
site() { env -u SLURM_CONF -u SGE_ROOT -u SGE_CELL -u SGE_QMASTER_PORT -u SGE_EXECD_PORT "$@"; }

# The site's Grid Engine cell directory, as the packaged wrappers find it.
site_cell() {
  # shellcheck disable=SC2016  # expanded by the inner bash
  site bash -c 'SGE_ROOT=/var/lib/gridengine SGE_CELL=default
    [ -r /etc/default/gridengine ] && . /etc/default/gridengine >/dev/null 2>&1
    echo "$SGE_ROOT/$SGE_CELL"'
}

# Pids of the test bed's own daemons, through its pid files.
testbed_pids() {
  local f
  running_pid "$PID_MUNGED" munged || true
  running_pid "$PID_SLURMCTLD" slurmctld || true
  running_pid "$PID_SLURMD" slurmd || true
  running_pid "$PID_QMASTER" sge_qmaster || true
  for f in "$SGE_SPOOL"/execd/*/execd.pid; do running_pid "$f" sge_execd || true; done
  running_pid "$PID_SSHD" sshd || true
  pbs_pids   # PBS's four, its PostgreSQL and its sshd, inside its namespace
}

DAEMONS=" munged slurmctld slurmd sge_qmaster sge_execd sshd pbs_server.bin pbs_sched pbs_comm pbs_mom "
# Every daemon of those names that is not the child of another (an sshd's
# per-connection processes are) and not the test bed's: name, pid, start time
# (clock ticks after boot) and program. (Not the command line: sshd rewrites
# its own with the number of connections under way.)
site_daemons() {
  local mine p pid comm stat ppid start
  mine=" $(testbed_pids | paste -sd' ' -) "
  for p in /proc/[0-9]*; do
    pid=${p#/proc/}
    comm=$(cat "$p/comm" 2>/dev/null) || continue
    [[ $DAEMONS == *" $comm "* && $mine != *" $pid "* ]] || continue
    stat=$(cat "$p/stat" 2>/dev/null) || continue
    read -r -a f <<<"${stat##*) }"   # fields from the 3rd on: state ppid ...
    [[ ${f[0]} == Z ]] && continue
    ppid=${f[1]} start=${f[19]}
    [[ $DAEMONS == *" $(cat "/proc/$ppid/comm" 2>/dev/null) "* ]] && continue
    echo "$comm pid $pid start $start ($(readlink "$p/exe" 2>/dev/null || echo '?'))"
  done | sort
}

snapshot() {
  local dir=$1 cell f
  mkdir -p "$dir"
  cell=$(site_cell)
  {
    find /etc/slurm /etc/munge \( -type f -o -type l \) 2>/dev/null
    ls -d /etc/ssh/sshd_config /etc/ssh/sshd_config_* /etc/ssh/sshd_config.d/* /etc/ssh/ssh_host_* \
      /etc/ssh/ssh_known_hosts /etc/default/gridengine /etc/profile.d/* /etc/hosts /etc/services \
      /etc/pbs.conf 2>/dev/null
    find "$cell/common" -maxdepth 1 -type f ! -name accounting 2>/dev/null
  } | sort -u | while read -r f; do
    printf '%s %s %s\n' "$f" "$(stat -c '%U:%G %a' "$f")" "$(sha256sum < "$f" | cut -d' ' -f1)"
  done > "$dir/files"
  site qconf -sconf > "$dir/qconf -sconf" 2>&1
  site qconf -ssconf > "$dir/qconf -ssconf" 2>&1
  site qconf -sq all.q > "$dir/qconf -sq all.q" 2>&1
  # Not the first line, "Configuration data as of <now>", nor the job id
  # counter, which the site's own jobs move on.
  site scontrol show config 2>&1 | tail -n +2 | grep -v '^NEXT_JOB_ID ' > "$dir/scontrol show config"
  site_daemons > "$dir/daemons"
}

# --- 1, 2: the site and its snapshot ---------------------------------------------
log "the site: Slurm, munge, Grid Engine and sshd in the standard places"
bash "$HERE/site.sh" up || { fail "site.sh up failed: no site to check against"; echo "guest-check: FAIL"; exit 1; }
snapshot "$WORK/before"
log "site snapshot: $(wc -l < "$WORK/before/files") files, $(wc -l < "$WORK/before/daemons") daemons: $(cut -d: -f1 "$WORK/before/daemons" | paste -sd, -)"
if [[ ! -s $WORK/before/daemons ]]; then fail "no site daemon runs: nothing would show a change"; fi

# --- 3: the test bed, through its life ------------------------------------------
tb_was_up=0
[[ -n $(testbed_pids) ]] && tb_was_up=1
if ((COLD)); then
  log "test bed: down.sh --purge, for a cold start"
  bash "$HERE/down.sh" --purge || fail "down.sh --purge failed"
else
  bash "$HERE/down.sh" || fail "down.sh failed"
fi
t=$(now)
if bash "$HERE/up.sh"; then
  UP_COLD=$(secs "$t")
  CLIENT_KEY=$(home_of "$TB_CLIENT")/.ssh/id_ed25519
  remote() {
    timeout 180 runuser -u "$TB_CLIENT" -- ssh -o BatchMode=yes -o StrictHostKeyChecking=yes \
      -o ConnectTimeout=10 -p "$TB_SSH_PORT" -i "$CLIENT_KEY" "$TB_USER@$TB_SSH_HOST" "$@"
  }
  # shellcheck disable=SC2016  # expanded by the remote shell and the jobs
  jobs=$(remote 'set -e; mkdir -p ~/.lxm3-guest-check; cd ~/.lxm3-guest-check; rm -f slurm.out sge.out
    sbatch --parsable --wait --output=slurm.out --wrap "echo slurm \$SLURM_CLUSTER_NAME" >/dev/null
    echo "echo sge \$SGE_CELL" | qsub -sync y -terse -cwd -S /bin/sh -N guestcheck -j y -o sge.out >/dev/null
    cat slurm.out sge.out' 2>&1)
  if [[ $jobs == "slurm $SLURM_CLUSTER"$'\n'"sge $SGE_CELL" ]]; then
    log "jobs through the test bed's sshd ran on its clusters: $(paste -sd, - <<<"$jobs")"
  else
    fail "jobs through the test bed's sshd: expected 'slurm $SLURM_CLUSTER' and 'sge $SGE_CELL', got: $jobs"
  fi
  # PBS, through its own sshd, when up.sh brought it up.
  PBS_JOB_NOTE=
  if grep -qx 'LXM3_TESTBED_PBS=1' "$TB_ENV_FILE" 2>/dev/null; then
    # shellcheck disable=SC2016  # expanded by the remote shell and the job
    pbs=$(timeout 180 runuser -u "$TB_CLIENT" -- ssh -o BatchMode=yes -o StrictHostKeyChecking=yes \
      -o ConnectTimeout=10 -i "$CLIENT_KEY" "$TB_USER@$TB_PBS_ADDR" \
      "set -e; cd ~/.lxm3-guest-check; rm -f pbs.out
       echo 'echo pbs \$PBS_O_HOST' | $PBS_EXEC/bin/qsub -W block=true -j oe -o \$PWD/pbs.out >/dev/null
       for i in \$(seq 1 40); do [ -s pbs.out ] && break; sleep 0.25; done; cat pbs.out" 2>&1)
    if [[ $pbs == "pbs $PBS_SERVER" ]]; then
      log "a job through the test bed's PBS sshd ran on its PBS: $pbs"
      PBS_JOB_NOTE=" and a PBS job"
    else
      fail "a job through the test bed's PBS sshd: expected 'pbs $PBS_SERVER', got: $pbs"
    fi
  else
    log "no PBS in $TB_ENV_FILE: $(grep '^# pbs left out' "$TB_ENV_FILE" 2>/dev/null || echo '?')"
  fi
  pids=$(testbed_pids | paste -sd' ' -)
  t=$(now)
  bash "$HERE/up.sh" >/dev/null || fail "up.sh, run again, failed"
  UP_WARM=$(secs "$t")
  [[ $(testbed_pids | paste -sd' ' -) == "$pids" ]] ||
    fail "up.sh, run again, changed the test bed's daemons: $pids -> $(testbed_pids | paste -sd' ' -)"
else
  fail "up.sh failed beside the site"
fi
bash "$HERE/down.sh" || fail "down.sh failed"
[[ -z $(testbed_pids) ]] || fail "down.sh left test bed daemons running: $(testbed_pids | paste -sd' ' -)"
if pbs_netns_exists || ip link show "$PBS_VETH_HERE" >/dev/null 2>&1 || [[ -e $PBS_NETNS_ETC ]]; then
  fail "down.sh left PBS's network namespace $PBS_NETNS, its veth $PBS_VETH_HERE or $PBS_NETNS_ETC"
fi

# --- 4: the site afterwards ---------------------------------------------------------
snapshot "$WORK/after"
for f in "$WORK/before"/*; do
  name=${f##*/}
  if ! cmp -s "$f" "$WORK/after/$name"; then
    changes=$(diff "$f" "$WORK/after/$name" | grep '^[<>]' | sed 's/^</  before:/; s/^>/  after: /')
    if (($(wc -l <<<"$changes") > 12)); then
      changes="$(head -n 12 <<<"$changes")"$'\n'"  ... ($(($(wc -l <<<"$changes") - 12)) more lines)"
    fi
    fail "the site's '$name' changed:"$'\n'"$changes"
  fi
done
if grep -q '^slurmctld ' "$WORK/before/daemons"; then
  site sinfo -h >/dev/null 2>&1 || fail "the site's Slurm does not answer sinfo: $(site sinfo 2>&1 | tail -n 1)"
fi
if grep -q '^sge_qmaster ' "$WORK/before/daemons"; then
  site qstat >/dev/null 2>&1 || fail "the site's Grid Engine does not answer qstat: $(site qstat 2>&1 | tail -n 1)"
fi
banner=$(timeout 10 bash -c 'exec 3<>/dev/tcp/127.0.0.1/22; head -c 7 <&3' 2>/dev/null || true)
[[ $banner == SSH-2.0 ]] || fail "the site's sshd on 127.0.0.1:22 does not answer (banner '$banner')"

# --- 5: leave the machine as found -------------------------------------------------
bash "$HERE/site.sh" down || fail "site.sh down failed"
if ((tb_was_up)); then
  log "the test bed was up before: up.sh again"
  bash "$HERE/up.sh" >/dev/null || fail "up.sh (bringing the test bed back) failed"
fi

if ((${#FAILURES[@]})); then
  echo "guest-check: FAIL (${#FAILURES[@]} problem(s), $(secs "$T0") s):"
  printf -- '- %s\n' "${FAILURES[@]}"
  exit 1
fi
echo "guest-check: PASS in $(secs "$T0") s: beside the site's $(cut -d' ' -f1 "$WORK/before/daemons" | paste -sd' ' -), the test bed came up ($( ((COLD)) && echo cold || echo warm) ${UP_COLD} s, again ${UP_WARM} s), ran an sbatch and a qsub job${PBS_JOB_NOTE:-} and went down; $(wc -l < "$WORK/before/files") site files, 4 settings dumps and $(wc -l < "$WORK/before/daemons") daemons unchanged, sinfo, qstat and sshd answer"
