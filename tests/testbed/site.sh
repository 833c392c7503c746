#!/usr/bin/env bash
# site.sh - plays the site administrator for guest-check.sh: makes sure this
# machine has a "site" Slurm + munge, Grid Engine and sshd of its own, in the
# standard places (/etc/slurm, /etc/munge, /run/munge, the packaged Grid
# Engine cell under /var/lib/gridengine, /etc/ssh and port 22), so that the
# test bed can be shown to be a guest beside them.
#
#   site.sh up     start what is missing; a part that runs already is left
#                  as it is, and so is one configured by someone else (a
#                  config file without this script's mark) that does not run
#   site.sh down   stop the daemons `site.sh up` started, by their pid files
#
# Its configuration is told apart from the test bed's: Slurm MaxArraySize=1001
# (the test bed: 11), cluster "site", the standard ports. What `up` started is
# listed in $SITE_STARTED (one "pidfile comm" line each). Run as root.
set -Eeuo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TB_NAME=site
# The helpers only (pid files, apt): the test bed's paths are not used here,
# and the variables that would point the schedulers' commands at the test bed
# are dropped, so that every command below reaches the site's clusters.
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"
unset SLURM_CONF SGE_ROOT SGE_CELL SGE_QMASTER_PORT SGE_EXECD_PORT
trap 'on_err $LINENO "$BASH_COMMAND"' ERR
require_root
die() { trap - ERR; printf '[%s] ERROR: %s\n' "$TB_NAME" "$*" >&2; exit 1; }

SITE_STARTED=/run/lxm3-guest-check-site.started
MARK="# lxm3 guest-check site (tests/testbed/site.sh)"
SITE_SGE_MARK=/var/lib/gridengine/default/common/.lxm3-guest-check-site
HOST=$(hostname -s)
APT_LOG=/var/log/lxm3-guest-check-site-apt.log

started() { echo "$1 $2" >> "$SITE_STARTED"; log "started $2 (pid $(running_pid "$1" "$2"))"; }

site_down() {
  [[ -s $SITE_STARTED ]] || { log "nothing to stop: site.sh started no daemon"; return 0; }
  local pidfile comm pid
  # Reverse order: execd before qmaster, slurmd before slurmctld, munged last.
  while read -r pidfile comm; do
    if pid=$(running_pid "$pidfile" "$comm"); then
      log "stopping $comm (pid $pid)"
      stop_pid "$pid" "$comm" 30
    fi
  done < <(tac "$SITE_STARTED")
  rm -f "$SITE_STARTED"
}

if [[ ${1:-} == down ]]; then site_down; exit 0; fi
[[ ${1:-} == up ]] || { echo "usage: $0 up|down" >&2; exit 2; }

missing=()
for p in "${SLURM_PACKAGES[@]}" "${SSH_PACKAGES[@]}" "${SGE_PACKAGES[@]}" iproute2; do
  pkg_installed "$p" || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing ${missing[*]} (log: $APT_LOG)"
  apt_get update
  apt_get install -y --no-install-recommends "${missing[@]}"
fi
listening() { [[ -n $(port_listeners "$1") ]]; }

# --- munge and Slurm ---------------------------------------------------------
slurm_ours=0
if [[ ! -e /etc/slurm/slurm.conf ]] || [[ $(head -n 1 /etc/slurm/slurm.conf) == "$MARK" ]]; then
  slurm_ours=1
fi
if scontrol ping 2>/dev/null | grep -q 'is UP'; then
  log "Slurm: a site slurmctld answers already; left alone"
elif ((!slurm_ours)); then
  log "Slurm: /etc/slurm/slurm.conf is someone else's and its slurmctld does not answer; left alone"
else
  if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    [[ -s /etc/munge/munge.key ]] || { mungekey --create --keyfile=/etc/munge/munge.key; chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key; }
    install -d -o munge -g munge -m 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged
    wait_pidfile /run/munge/munged.pid munged >/dev/null || die "munged did not start"
    started /run/munge/munged.pid munged
  fi
  install -d -m 0755 /etc/slurm /var/spool/slurmd
  install -d -o slurm -g slurm -m 0755 /var/spool/slurmctld /var/log/slurm
  if [[ ! -e /etc/slurm/slurm.conf ]]; then
    cat > /etc/slurm/slurm.conf <<EOF
$MARK
ClusterName=site
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
MaxArraySize=1001
ReturnToService=2
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$(nproc) State=UNKNOWN
PartitionName=site Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
  fi
  running_pid /run/slurmctld.pid slurmctld >/dev/null || { /usr/sbin/slurmctld; wait_pidfile /run/slurmctld.pid slurmctld >/dev/null || die "slurmctld did not start"; started /run/slurmctld.pid slurmctld; }
  running_pid /run/slurmd.pid slurmd >/dev/null || { /usr/sbin/slurmd; wait_pidfile /run/slurmd.pid slurmd >/dev/null || die "slurmd did not start"; started /run/slurmd.pid slurmd; }
fi

# --- Grid Engine: the packaged cell "default" ---------------------------------
QMASTER_PID=/var/spool/gridengine/qmaster/qmaster.pid
if qstat >/dev/null 2>&1; then
  log "Grid Engine: a site qmaster answers already; left alone"
elif [[ -e /var/spool/gridengine/qmaster/messages && ! -e $SITE_SGE_MARK ]]; then
  log "Grid Engine: the cell 'default' has been used by someone else and its qmaster does not answer; left alone"
else
  # A cell nobody has run (as the package leaves it) or this script's own.
  common=/var/lib/gridengine/default/common
  if [[ ! -e /var/spool/gridengine/spooldb/sge ]]; then
    install -d -o sgeadmin -g sgeadmin -m 0755 /var/lib/gridengine/default "$common" \
      /var/spool/gridengine/qmaster /var/spool/gridengine/spooldb /var/spool/gridengine/execd
    [[ -e $common/bootstrap ]] || install -m 0644 -o sgeadmin -g sgeadmin /usr/share/gridengine/default-bootstrap "$common/bootstrap"
    runuser -u sgeadmin -- /usr/share/gridengine/scripts/init_cluster /var/lib/gridengine default /var/spool/gridengine/spooldb sgeadmin >/dev/null
  fi
  touch "$SITE_SGE_MARK"
  # Where this host's name resolves to 127.0.0.1 first named "localhost" (see
  # up.sh), the cell needs the alias too.
  name=$(SGE_CELL=__none__ "$SGE_LIB/gethostname" -name)
  rev=$(SGE_CELL=__none__ "$SGE_LIB/gethostbyaddr" -name 127.0.0.1 2>/dev/null || true)
  [[ -n $rev && $rev != "$name" && ! -e $common/host_aliases ]] && echo "$name $rev" > "$common/host_aliases"
  echo "$name" > "$common/act_qmaster"
  chown sgeadmin:sgeadmin "$common"/*
  (cd / && setsid /usr/sbin/sge_qmaster </dev/null >/dev/null 2>&1)
  wait_pidfile "$QMASTER_PID" sge_qmaster >/dev/null || die "sge_qmaster did not start"
  started "$QMASTER_PID" sge_qmaster
  for ((i = 0; i < 120; i++)); do qconf -sh >/dev/null 2>&1 && break; sleep 0.25; done
  qconf -sh 2>/dev/null | grep -qxF "$name" || qconf -ah "$name" >/dev/null 2>&1
  qconf -ss 2>/dev/null | grep -qxF "$name" || qconf -as "$name" >/dev/null 2>&1
  if ! qconf -se "$name" >/dev/null 2>&1; then
    printf 'hostname %s\nload_scaling NONE\ncomplex_values NONE\nuser_lists NONE\nxuser_lists NONE\nprojects NONE\nxprojects NONE\nusage_scaling NONE\nreport_variables NONE\n' "$name" > /tmp/site-exechost
    qconf -Ae /tmp/site-exechost >/dev/null 2>&1; rm -f /tmp/site-exechost
  fi
  # Queue all.q: the packaged template, on this host and without the
  # template's parallel environments (none exist), edited by a script.
  if ! qconf -sq all.q >/dev/null 2>&1; then
    editor=$(mktemp /tmp/lxm3-site-editor.XXXXXX)
    # shellcheck disable=SC2016  # "$1" is the editor script's argument
    printf '#!/bin/sh\nsed -i -e "s/^pe_list .*/pe_list NONE/" -e "s/^hostlist .*/hostlist %s/" "$1"\n' "$name" > "$editor"
    chmod 0755 "$editor"
    out=$(EDITOR=$editor qconf -aq all.q 2>&1) || { rm -f "$editor"; die "qconf -aq all.q failed: $out"; }
    rm -f "$editor"
  fi
  (cd / && setsid /usr/sbin/sge_execd </dev/null >/dev/null 2>&1)
  for ((i = 0; i < 120; i++)); do
    f=$(compgen -G "/var/spool/gridengine/execd/*/execd.pid" | head -n 1 || true)
    [[ -n $f ]] && running_pid "$f" sge_execd >/dev/null && break
    sleep 0.25
  done
  if [[ -z $f ]] || ! running_pid "$f" sge_execd >/dev/null; then die "sge_execd did not start"; fi
  started "$f" sge_execd
fi

# --- sshd on port 22, from /etc/ssh/sshd_config -------------------------------
if listening 22; then
  log "sshd: port 22 is served already; left alone"
else
  ssh-keygen -A >/dev/null                    # the standard host keys, if missing
  [[ -d /run/sshd ]] || install -d -m 0755 /run/sshd
  /usr/sbin/sshd -o ListenAddress=127.0.0.1 -o PidFile=/run/lxm3-guest-check-site-sshd.pid
  wait_pidfile /run/lxm3-guest-check-site-sshd.pid sshd >/dev/null || die "sshd did not start"
  started /run/lxm3-guest-check-site-sshd.pid sshd
fi
log "site up"
