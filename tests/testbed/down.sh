#!/usr/bin/env bash
# down.sh - stop what up.sh started: sge_execd, sge_qmaster, slurmd,
# slurmctld, munged and the loopback sshd. Queued and running jobs are
# cancelled first. Each daemon is found through its pid file only, and only
# that pid is signalled. Packages, configuration, the test user, keys, job
# databases and /etc/lxm3-testbed.env stay, so the next up.sh is quick (the
# env file describes the installed test bed; the test suite checks that the
# daemons answer before using them).
#
#   down.sh           stop the daemons
#   down.sh --purge   also purge the Slurm, munge and gridengine packages and
#                     their state, configuration and logs, the env file, the
#                     sshd configuration and the SGE lines in the test user's
#                     ~/.bashrc, for a cold up.sh. Kept: openssh and rsync
#                     (packages and host keys), libraries and other packages
#                     pulled in as dependencies (exim4, bsd-mailx, tcsh, ...:
#                     see apt-get autoremove), the test user, the client's key.
set -Euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TB_NAME=testbed-down
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"
require_root

PURGE=0
case ${1:-} in
  --purge) PURGE=1 ;;
  "") ;;
  *) echo "usage: $0 [--purge]" >&2; exit 2 ;;
esac
T0=$(now)

# --- Grid Engine ---------------------------------------------------------------
# qconf -kej: execd kills its running jobs, then exits. Job shepherds are its
# children; any still alive after execd is gone are stopped by pid.
if pid=$(sge_execd_pid); then
  log "stopping sge_execd (pid $pid) and its jobs"
  mapfile -t shepherds < <(ps -o pid= --ppid "$pid" 2>/dev/null || true)
  timeout 20 qconf -kej all >/dev/null 2>&1 || true
  wait_exit "$pid" sge_execd 20 || stop_pid "$pid" sge_execd 20
  for p in "${shepherds[@]}"; do stop_pid "${p// /}" sge_shepherd 5; done
fi
# qmaster's controlled shutdown takes about 10 s: ask for it now and stop
# Slurm meanwhile.
qmaster=
if qmaster=$(sge_qmaster_pid); then
  log "stopping sge_qmaster (pid $qmaster)"
  timeout 20 qconf -km >/dev/null 2>&1 || kill -TERM "$qmaster" 2>/dev/null || true
fi

# --- Slurm, munge ----------------------------------------------------------------
if running_pid "$PID_SLURMCTLD" slurmctld >/dev/null; then
  jobs=$(squeue -h -o %F 2>/dev/null | sort -u | paste -sd' ' - || true)
  if [[ -n $jobs ]]; then
    log "cancelling Slurm jobs: $jobs"
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
  pkgs=()
  for p in "${SLURM_PACKAGES[@]}" slurm-wlm-basic-plugins "${SGE_PACKAGES[@]}" gridengine-common; do
    [[ -n $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -v 'not-installed' || true) ]] && pkgs+=("$p")
  done
  if ((${#pkgs[@]})); then
    log "purging ${pkgs[*]}"
    apt_get purge -y "${pkgs[@]}" || { log "apt-get purge failed (see $APT_LOG)"; exit 1; }
  fi
  rm -rf /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm \
         /etc/munge /var/lib/munge /var/log/munge /run/munge \
         "$SGE_ROOT" "$SGE_SPOOL" /var/run/gridengine /etc/default/gridengine /etc/profile.d/gridengine.sh \
         "$SSHD_CONF" "$SSHD_LOG" "$TB_ENV_FILE"
  rc=$(home_of "$TB_USER" || true)/.bashrc
  if id -u "$TB_USER" >/dev/null 2>&1 && [[ -f $rc ]] && grep -qxF "$BASHRC_BEGIN" "$rc"; then
    sed -i "/^$BASHRC_BEGIN\$/,/^$BASHRC_END\$/d" "$rc"
  fi
  log "purged"
fi
log "done in $(secs "$T0") s"
