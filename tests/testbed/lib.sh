# shellcheck shell=bash disable=SC2034  # the variables are used by the scripts that source this
# lib.sh - settings and helpers shared by up.sh, down.sh and selftest.sh.
# Sourced, never run. Everything here is plain bash 5 (EPOCHREALTIME, BASHPID).
#
# Every daemon the test bed starts is tracked through its own pid file, and
# only the pid in that file is ever signalled: nothing is looked up or killed
# by process name, so other Slurm/SGE/sshd processes on the machine are safe.

export LC_ALL=C
export DEBIAN_FRONTEND=noninteractive
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH

# --- settings (environment variables, see README.md) -------------------------
TB_ENV_FILE=${TESTBED_ENV_FILE:-/etc/lxm3-testbed.env}
TB_USER=${TESTBED_USER:-lxm3test}            # unprivileged account jobs run as
TB_CLIENT=${TESTBED_CLIENT_USER:-root}       # account the test suite runs as
TB_SSH_PORT=${TESTBED_SSH_PORT:-22}
TB_SSH_HOST=localhost
TB_TIMEOUT=${TESTBED_READY_TIMEOUT:-60}      # seconds to wait for each daemon
# Small array limits, so that tests of lxm3's array splitting stay cheap.
# Slurm: the largest array index is MaxArraySize-1 (0-10 here).
TB_SLURM_MAX_ARRAY_SIZE=${TESTBED_SLURM_MAX_ARRAY_SIZE:-11}
# Seconds a finished Slurm job stays visible to squeue/scontrol (there is no
# sacct: no slurmdbd). Slurm purges old jobs about once a minute, so a job is
# visible for MinJobAge to MinJobAge+60 s after it ends: 90 s gives a slow test
# on a loaded CI machine ample time to read the final state, while a test of
# the "job id no longer known" path waits at most about 150 s.
TB_SLURM_MIN_JOB_AGE=${TESTBED_SLURM_MIN_JOB_AGE:-90}
TB_SLURM_CPUS=${TESTBED_SLURM_CPUS:-}        # empty: what slurmd -C detects
# Grid Engine: the most tasks one array job may have (qsub -t 1-N, N <= this).
TB_SGE_MAX_AJ_TASKS=${TESTBED_SGE_MAX_AJ_TASKS:-10}
TB_SGE_SLOTS=${TESTBED_SGE_SLOTS:-$(nproc)}

# --- fixed names and paths ---------------------------------------------------
SLURM_CLUSTER=testbed
SLURM_PARTITION=debug
SLURM_CONF=/etc/slurm/slurm.conf
PID_SLURMCTLD=/run/slurmctld.pid
PID_SLURMD=/run/slurmd.pid
PID_MUNGED=/run/munge/munged.pid      # the same file Debian's init script uses
SSHD_CONF=/etc/ssh/sshd_config_lxm3_testbed
PID_SSHD=/run/sshd-lxm3-testbed.pid
SSHD_LOG=/var/log/sshd-lxm3-testbed.log
APT_LOG=/var/log/lxm3-testbed-apt.log
# Debian's gridengine packages hard-code SGE_ROOT; the cell is "default".
export SGE_ROOT=/var/lib/gridengine
export SGE_CELL=default
SGE_COMMON=$SGE_ROOT/$SGE_CELL/common
SGE_SPOOL=/var/spool/gridengine
SGE_LIB=/usr/lib/gridengine
SGE_QUEUE=all.q
SGE_PE=smp
PID_QMASTER=$SGE_SPOOL/qmaster/qmaster.pid
# The execd pid file is $SGE_SPOOL/execd/<name SGE gives this host>/execd.pid.
BASHRC_BEGIN='# >>> lxm3 testbed: gridengine >>>'
BASHRC_END='# <<< lxm3 testbed: gridengine <<<'

SLURM_PACKAGES=(slurm-wlm slurmctld slurmd slurm-client munge)
SSH_PACKAGES=(openssh-server openssh-client rsync)
SGE_PACKAGES=(gridengine-master gridengine-exec gridengine-client)
# lxm3 itself runs on the "login node" as the test user under the system Python,
# which packages with pip; unzip unpacks archives in job scripts.
LOGIN_NODE_PACKAGES=(python3 python3-pip unzip)

# --- logging, errors, timing -------------------------------------------------
TB_NAME=${TB_NAME:-testbed}
log() { printf '[%s %(%H:%M:%S)T] %s\n' "$TB_NAME" -1 "$*"; }
now() { printf '%s' "$EPOCHREALTIME"; }
secs() { awk -v a="$1" -v b="${2:-$EPOCHREALTIME}" 'BEGIN { printf "%.1f", b - a }'; }

dump_logs() {
  local f
  for f in /var/log/munge/munged.log /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log \
           "$SSHD_LOG" "$SGE_SPOOL/qmaster/messages" "$SGE_SPOOL"/execd/*/messages; do
    [[ -f $f ]] || continue
    echo "----- last 30 lines of $f -----"
    tail -n 30 "$f"
  done
}

die() {
  trap - ERR
  printf '[%s] ERROR: %s\n' "$TB_NAME" "$*" >&2
  dump_logs >&2
  exit 1
}

# Under `set -E`, an unhandled failure in the main shell or one of its
# functions aborts with the daemon logs; inside $(...) the caller decides.
on_err() { [[ $BASHPID == "$$" ]] && die "command failed (line $1): $2"; return 0; }

require_root() { [[ $(id -u) == 0 ]] || { echo "$0 must run as root" >&2; exit 1; }; }

# --- daemons, tracked by pid file only ---------------------------------------
# True if process $1 exists, is not a zombie and its command name is $2.
# (Without systemd nothing reaps stopped daemons at once: they linger as
# zombies for a few seconds and must count as stopped.)
pid_alive() {
  local pid=$1 comm=$2 stat
  [[ -r /proc/$pid/comm && $(< "/proc/$pid/comm") == "$comm" ]] 2>/dev/null || return 1
  stat=$(< "/proc/$pid/stat") 2>/dev/null || return 1
  stat=${stat##*) }
  [[ ${stat%% *} != Z ]]
}

# Print the pid in pid file $1 if it is a live process named $2.
running_pid() {
  local pidfile=$1 comm=$2 pid
  [[ -s $pidfile ]] || return 1
  read -r pid < "$pidfile" || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  pid_alive "$pid" "$comm" || return 1
  echo "$pid"
}

# Wait until pid file $1 names a live $2 and print the pid.
wait_pidfile() {
  local i pid
  for ((i = 0; i < TB_TIMEOUT * 5; i++)); do
    if pid=$(running_pid "$1" "$2"); then echo "$pid"; return 0; fi
    sleep 0.2
  done
  return 1
}

# Wait up to $3 seconds for pid $1 (named $2) to exit.
wait_exit() {
  local i
  for ((i = 0; i < $3 * 5; i++)); do
    pid_alive "$1" "$2" || return 0
    sleep 0.2
  done
  return 1
}

# Stop pid $1 (named $2): SIGTERM, SIGKILL after $3 seconds (default 20).
stop_pid() {
  local pid=$1 comm=$2 grace=${3:-20}
  pid_alive "$pid" "$comm" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  wait_exit "$pid" "$comm" "$grace" && return 0
  log "$comm (pid $pid) ignored SIGTERM for $grace s; sending SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  wait_exit "$pid" "$comm" 5 || true
}

# Stop the daemon in pid file $1 (named $2) and remove the pid file.
stop_daemon() {
  local pid
  if pid=$(running_pid "$1" "$2"); then
    log "stopping $2 (pid $pid)"
    stop_pid "$pid" "$2" "${3:-20}"
  fi
  rm -f "$1"
}

# Grid Engine daemons write their pid files themselves, in their spool.
sge_qmaster_pid() { running_pid "$PID_QMASTER" sge_qmaster; }
sge_execd_pid() {
  local f
  for f in "$SGE_SPOOL"/execd/*/execd.pid; do
    running_pid "$f" sge_execd && return 0
  done
  return 1
}

# --- files -------------------------------------------------------------------
# Install stdin as file $1 (mode $2, owner $3, default root) if its content
# differs. Returns 0 if the file changed, 1 if it was already up to date.
write_if_changed() {
  local dest=$1 mode=$2 owner=${3:-root} tmp
  tmp=$(mktemp)
  cat > "$tmp"
  if [[ -f $dest ]] && cmp -s "$tmp" "$dest"; then rm -f "$tmp"; return 1; fi
  install -m "$mode" -o "$owner" -g "$(id -gn "$owner")" "$tmp" "$dest"
  rm -f "$tmp"
}

home_of() { getent passwd "$1" | cut -d: -f6; }

# --- apt -----------------------------------------------------------------------
pkg_installed() { [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) == "install ok installed" ]]; }

# apt-get "$@", output appended to $APT_LOG. While another process (an image's
# unattended upgrade, a parallel provisioning step) holds the apt/dpkg lock it
# waits and retries every 5 s for up to 10 minutes; nothing is killed.
apt_get() {
  local attempt rc out
  out=$(mktemp)
  for ((attempt = 1; attempt <= 120; attempt++)); do
    rc=0
    apt-get -q -o DPkg::Lock::Timeout=60 "$@" > "$out" 2>&1 || rc=$?
    { echo "+ apt-get $* (attempt $attempt, exit $rc)"; cat "$out"; } >> "$APT_LOG"
    if ((rc == 0)); then rm -f "$out"; return 0; fi
    if grep -qiE 'could not get lock|unable to lock|unable to acquire|is locked by another process' "$out"; then
      log "apt/dpkg lock held by another process; retrying in 5 s (attempt $attempt)"
      sleep 5
      continue
    fi
    echo "----- apt-get $* failed (exit $rc); last 30 lines (all in $APT_LOG) -----" >&2
    tail -n 30 "$out" >&2
    rm -f "$out"
    return "$rc"
  done
  rm -f "$out"
  return 1
}
