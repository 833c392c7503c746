#!/usr/bin/env bash
# down.sh - stop what up.sh started: the test bed's sge_execd, sge_qmaster,
# slurmd, slurmctld, munged and sshd, and its PBS (pbs.sh). Its jobs are
# cancelled first. Each daemon is found through the test bed's own pid file
# only, and only that pid is signalled; the scheduler commands used here reach
# the test bed's clusters only (lib.sh exports their SLURM_CONF, SGE_ROOT,
# SGE_CELL and ports). A site's Slurm, munge, Grid Engine or sshd is never
# touched. Configuration, keys, job databases, the test user and the env file
# stay, so the next up.sh is quick (the env file describes the installed test
# bed; the test suite checks that the daemons answer before using them).
#
#   down.sh           stop the daemons
#   down.sh --pbs     only the PBS part (pbs.sh): its daemons, its sshd, every
#                     process left in its network namespace, the namespace,
#                     its veth pair and /etc/netns/lxm3tb-pbs; with --purge
#                     also its directory and known_hosts block. The programs
#                     in /opt/pbs always stay (like packages).
#   down.sh --purge   also remove everything the test bed wrote: its directory
#                     ($TB_ROOT: configuration, keys, state, spool, logs), the
#                     env file, its block in the client's known_hosts and in
#                     the test user's ~/.profile and ~/.bashrc, for a cold
#                     up.sh. Kept: packages (a site may use them too; remove
#                     them with apt-get yourself), the test user and its home,
#                     the client's ssh key.
set -Euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TB_NAME=testbed-down
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"
# shellcheck source-path=SCRIPTDIR source=pbs.sh
. "$HERE/pbs.sh"
require_root

PURGE=0
ONLY_PBS=0
for arg; do
  case $arg in
    --purge) PURGE=1 ;;
    --pbs) ONLY_PBS=1 ;;
    *) echo "usage: $0 [--pbs] [--purge]" >&2; exit 2 ;;
  esac
done
T0=$(now)

# --- PBS, in its own network namespace (pbs.sh) -----------------------------------
pbs_down "$PURGE"
if ((ONLY_PBS)); then
  log "PBS part done in $(secs "$T0") s"
  exit 0
fi

# --- Grid Engine ---------------------------------------------------------------
# qconf -kej HOST, sent to the test bed's qmaster: its execd kills its running
# jobs, then exits. Job shepherds are execd's children; any still alive after
# execd is gone are stopped by pid.
if pid=$(sge_execd_pid); then
  log "stopping sge_execd (pid $pid) and its jobs"
  mapfile -t shepherds < <(ps -o pid= --ppid "$pid" 2>/dev/null || true)
  if sge_qmaster_pid >/dev/null && [[ -s $SGE_COMMON/act_qmaster ]]; then
    timeout 20 qconf -kej "$(< "$SGE_COMMON/act_qmaster")" >/dev/null 2>&1 || true
  fi
  wait_exit "$pid" sge_execd 20 || stop_pid "$pid" sge_execd 20
  for p in "${shepherds[@]}"; do stop_pid "${p// /}" sge_shepherd 5; done
fi
# SIGTERM starts qmaster's controlled shutdown, which takes about 10 s: send
# it now and stop Slurm meanwhile.
qmaster=
if qmaster=$(sge_qmaster_pid); then
  log "stopping sge_qmaster (pid $qmaster)"
  kill -TERM "$qmaster" 2>/dev/null || true
fi

# --- Slurm, munge, sshd -----------------------------------------------------------
if running_pid "$PID_SLURMCTLD" slurmctld >/dev/null && [[ -f $SLURM_CONF ]]; then
  jobs=$(squeue -h -o %F 2>/dev/null | sort -u | paste -sd' ' - || true)
  if [[ -n $jobs ]]; then
    log "cancelling the test bed's Slurm jobs: $jobs"
    # shellcheck disable=SC2086  # one argument per job id
    scancel $jobs || true
    for ((i = 0; i < 60; i++)); do
      [[ -z $(squeue -h -o %i 2>/dev/null || true) ]] && break
      sleep 0.5
    done
  fi
fi
stop_daemon "$PID_SLURMD" slurmd
stop_daemon "$PID_SLURMCTLD" slurmctld
stop_daemon "$PID_MUNGED" munged
stop_daemon "$PID_SSHD" sshd

if [[ -n $qmaster ]]; then
  wait_exit "$qmaster" sge_qmaster 30 || stop_pid "$qmaster" sge_qmaster 30
fi

# --- optional purge -------------------------------------------------------------
if ((PURGE)); then
  if [[ -d $TB_ROOT && ! -e $ROOT_MARK && -n $(ls -A "$TB_ROOT") ]]; then
    log "$TB_ROOT is not the test bed's (no $ROOT_MARK); not removing it"
    exit 1
  fi
  if [[ -d $TB_ROOT ]]; then
    find "$TB_ROOT" -mindepth 1 -delete
    rmdir "$TB_ROOT" 2>/dev/null || true   # (a mount point stays)
  fi
  if [[ -f $TB_ENV_FILE ]] && grep -qxF "LXM3_TESTBED_ROOT=$TB_ROOT" "$TB_ENV_FILE"; then
    rm -f -- "$TB_ENV_FILE"
  fi
  CLIENT_HOME=$(home_of "$TB_CLIENT" || true)
  if [[ -n $CLIENT_HOME ]]; then
    replace_block "$CLIENT_HOME/.ssh/known_hosts" "$KNOWN_HOSTS_BEGIN" "$KNOWN_HOSTS_END" \
      "$TB_CLIENT" 0644 bottom </dev/null || true
  fi
  if [[ $(gecos_of "$TB_USER" || true) == "$USER_MARK" ]]; then
    home=$(home_of "$TB_USER")
    for rc in "$home/.profile" "$home/.bashrc"; do
      [[ -f $rc ]] && { replace_block "$rc" "$BASHRC_BEGIN" "$BASHRC_END" "$TB_USER" 0644 top </dev/null || true; }
    done
  fi
  log "purged $TB_ROOT and $TB_ENV_FILE"
fi
log "done in $(secs "$T0") s"
