# shellcheck shell=bash disable=SC2034  # the variables are used by the scripts that source this
# lib.sh - settings, paths and helpers shared by up.sh, down.sh and selftest.sh.
# Sourced, never run. Everything here is plain bash 5 (EPOCHREALTIME, BASHPID).
#
# The test bed is a guest on the machine. Everything it runs and writes is its
# own and lives under one directory, $TB_ROOT (/var/lib/lxm3-testbed): its own
# munged (own key and socket), slurmctld and slurmd (own slurm.conf, ports,
# state), Grid Engine qmaster and execd (own SGE_ROOT, cell, spool, ports) and
# sshd (own configuration, host keys, port, log). A Slurm, munge, Grid Engine
# or sshd already on the machine (the "site") is never read, edited, restarted
# or signalled: every daemon the test bed starts is tracked through its own pid
# file under $TB_ROOT, only the pid in that file is ever signalled, and nothing
# is looked up or killed by process name.
#
# The schedulers' client commands (sbatch, squeue, qsub, qconf, ...) find the
# test bed's clusters through the environment exported below (SLURM_CONF,
# SGE_ROOT, SGE_CELL, SGE_QMASTER_PORT, SGE_EXECD_PORT). Without them they
# would talk to the site's clusters, so the scripts export them first thing.

export LC_ALL=C
export DEBIAN_FRONTEND=noninteractive
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH

# --- settings (environment variables, see README.md) -------------------------
TB_ROOT=${TESTBED_ROOT:-/var/lib/lxm3-testbed}
TB_ENV_FILE=${TESTBED_ENV_FILE:-$TB_ROOT/testbed.env}   # what up.sh found, for the tests
TB_USER=${TESTBED_USER:-lxm3tb}              # the test bed's own account; jobs run as it
TB_CLIENT=${TESTBED_CLIENT_USER:-root}       # account the test suite runs as
TB_TIMEOUT=${TESTBED_READY_TIMEOUT:-60}      # seconds to wait for each daemon
# Ports of the test bed's own daemons, away from the standard ones a site
# uses (Slurm 6817/6818, Grid Engine 6444/6445, ssh 22): those plus 100, and
# 6922 for ssh. A port taken by another program makes up.sh stop and say so.
TB_SSH_PORT=${TESTBED_SSH_PORT:-6922}        # sshd, on 127.0.0.1 only
TB_SLURMCTLD_PORT=${TESTBED_SLURMCTLD_PORT:-6917}
TB_SLURMD_PORT=${TESTBED_SLURMD_PORT:-6918}
TB_SGE_QMASTER_PORT=${TESTBED_SGE_QMASTER_PORT:-6544}
TB_SGE_EXECD_PORT=${TESTBED_SGE_EXECD_PORT:-6545}
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

# --- the test bed's own files, all under $TB_ROOT ----------------------------
ROOT_MARK=$TB_ROOT/.lxm3-testbed           # says the directory is the test bed's
# The GECOS field of the account up.sh creates: an account without it is not
# the test bed's, and up.sh refuses to use it.
USER_MARK="lxm3 test bed ($TB_ROOT)"
APT_LOG=$TB_ROOT/apt.log
# munge: the munge user runs munged and must own the directory.
MUNGE_DIR=$TB_ROOT/munge
MUNGE_KEY=$MUNGE_DIR/munge.key
MUNGE_SOCKET=$MUNGE_DIR/munge.socket
MUNGE_SEED=$MUNGE_DIR/munged.seed
MUNGE_LOG=$MUNGE_DIR/munged.log
PID_MUNGED=$MUNGE_DIR/munged.pid
# Slurm: slurmctld runs as the slurm user (state, logs); slurmd as root.
SLURM_DIR=$TB_ROOT/slurm
export SLURM_CONF=$SLURM_DIR/slurm.conf
SLURM_STATE=$SLURM_DIR/state               # StateSaveLocation
SLURM_SPOOL=$SLURM_DIR/spool               # SlurmdSpoolDir
SLURM_LOG_DIR=$SLURM_DIR/log
PID_SLURMCTLD=$SLURM_DIR/slurmctld.pid
PID_SLURMD=$SLURM_DIR/slurmd.pid
SLURM_CLUSTER=lxm3tb
SLURM_NODE=lxm3tb                          # NodeName (slurmd -N); NodeHostname is this host
SLURM_PARTITION=debug
# Grid Engine: its own SGE_ROOT, whose bin/lib/utilbin/util are links to the
# packaged programs, with its own cell, spool, job tmpdir and ports.
export SGE_ROOT=$TB_ROOT/sge
export SGE_CELL=lxm3tb
export SGE_QMASTER_PORT=$TB_SGE_QMASTER_PORT
export SGE_EXECD_PORT=$TB_SGE_EXECD_PORT
SGE_COMMON=$SGE_ROOT/$SGE_CELL/common
SGE_SPOOL=$SGE_ROOT/spool
SGE_TMPDIR=$SGE_ROOT/tmp                   # the queue's tmpdir: job ids of two clusters can meet in /tmp
SGE_LIB=/usr/lib/gridengine                # the packaged programs
SGE_QUEUE=all.q
SGE_PE=smp
# Each job's processes get an extra group id from this range; a site's execd
# uses the packaged 65400-65500, and two clusters must not share ids.
SGE_GID_RANGE=64400-64499
PID_QMASTER=$SGE_SPOOL/qmaster/qmaster.pid
# The execd pid file is $SGE_SPOOL/execd/<name SGE gives this host>/execd.pid.
# sshd: its own configuration, host key, authorized keys, pid file and log.
SSH_DIR=$TB_ROOT/ssh
SSHD_CONF=$SSH_DIR/sshd_config
SSH_HOST_KEY=$SSH_DIR/ssh_host_ed25519_key
SSH_AUTH_DIR=$SSH_DIR/authorized_keys      # one file per user, named after it (%u)
PID_SSHD=$SSH_DIR/sshd.pid
SSHD_LOG=$SSH_DIR/sshd.log
TB_SSH_HOST=localhost
# Marked blocks the test bed owns in files it shares: the client's known_hosts
# and the test user's ~/.profile and ~/.bashrc. Replaced whole; nothing else
# in them changes.
KNOWN_HOSTS_BEGIN="# >>> lxm3 test bed $TB_ROOT: the host key of its sshd >>>"
KNOWN_HOSTS_END="# <<< lxm3 test bed $TB_ROOT <<<"
BASHRC_BEGIN="# >>> lxm3 test bed $TB_ROOT: its clusters >>>"
BASHRC_END="# <<< lxm3 test bed $TB_ROOT <<<"

# OpenPBS: its own complex in its own network namespace (PBS refuses
# loopback addresses, so it cannot listen on 127.0.0.1 like the others). The
# namespace has lo and one end of a veth pair ($TB_PBS_ADDR/30, no default
# route); the other end ($TB_PBS_PEER) stays here. Every PBS daemon, PBS's
# own PostgreSQL and a second sshd of the test bed run inside it. The server's
# host name resolves only inside the namespace (/etc/netns/$PBS_NETNS/hosts,
# which `ip netns exec` bind-mounts over /etc/hosts). The programs are a
# build of OpenPBS in $PBS_EXEC, treated like a package: built once from the
# source tarball when missing, kept by down.sh --purge. Its pbs.conf is the
# test bed's own, used through PBS_CONF_FILE (daemons, init script, clients
# and the setuid pbs_iff all read it); /etc/pbs.conf is never read or written.
TB_PBS=${TESTBED_PBS:-1}                     # 0: leave PBS out
TB_PBS_ADDR=${TESTBED_PBS_ADDR:-10.213.9.2}  # in the namespace; .1 of the /30 stays here
TB_PBS_PEER=${TB_PBS_ADDR%.*}.$((${TB_PBS_ADDR##*.} - 1))
TB_PBS_MAX_ARRAY_SIZE=${TESTBED_PBS_MAX_ARRAY_SIZE:-10}   # qsub -J: at most this many subjobs
TB_PBS_NCPUS=${TESTBED_PBS_NCPUS:-4}         # ncpus of the node: a few one-cpu jobs at once
# PBS's PostgreSQL: its TCP port is in the namespace, but its unix socket and
# lock (/run/postgresql/.s.PGSQL.PORT) are shared with every PostgreSQL of the
# machine, a site's PBS (15007) among them: a port of its own.
TB_PBS_DATA_SERVICE_PORT=${TESTBED_PBS_DATA_SERVICE_PORT:-15107}
PBS_EXEC=${TESTBED_PBS_EXEC:-/opt/pbs}       # the programs (bin/qsub); kept by --purge
PBS_SOURCE=${TESTBED_PBS_SOURCE:-}           # the source tarball; empty: shared/testbed/pbs/openpbs-*.tar.xz
PBS_NETNS=lxm3tb-pbs
PBS_VETH_HERE=lxm3tbpbs0                     # (interface names: at most 15 characters)
PBS_VETH_NS=lxm3tbpbs1
PBS_SERVER=lxm3tbpbs                         # server, comm and node name; job ids end in .lxm3tbpbs
PBS_NETNS_ETC=/etc/netns/$PBS_NETNS          # hosts and resolv.conf inside the namespace
PBS_DIR=$TB_ROOT/pbs
PBS_CONF=$PBS_DIR/pbs.conf                   # PBS_CONF_FILE
PBS_HOME_DIR=$PBS_DIR/home                   # PBS_HOME: spool, logs, datastore, *_priv
PBS_SSHD_CONF=$PBS_DIR/sshd_config
PBS_SSH_HOST_KEY=$PBS_DIR/ssh_host_ed25519_key
PID_PBS_SSHD=$PBS_DIR/sshd.pid
PBS_SSHD_LOG=$PBS_DIR/sshd.log
PBS_LOG=$PBS_DIR/pbs.log                     # the init script's and the build's output
# PBS's own lock files hold its daemons' pids (file:process name).
PBS_PIDFILES=(server_priv/server.lock:pbs_server.bin sched_priv/sched.lock:pbs_sched
  server_priv/comm.lock:pbs_comm mom_priv/mom.lock:pbs_mom datastore/postmaster.pid:postgres)
KNOWN_HOSTS_PBS_BEGIN="# >>> lxm3 test bed $TB_ROOT: the host key of its PBS sshd ($PBS_NETNS) >>>"
KNOWN_HOSTS_PBS_END="# <<< lxm3 test bed $TB_ROOT: PBS <<<"
# Building OpenPBS and running it (its PostgreSQL, Tcl, libical, ...).
PBS_PACKAGES=(gcc g++ make autoconf automake libtool m4 pkg-config libhwloc-dev libx11-dev
  libxt-dev libedit-dev libical-dev libncurses-dev perl postgresql-server-dev-all postgresql
  postgresql-contrib python3-dev tcl-dev tk-dev swig expat libexpat1-dev libssl-dev libxext-dev
  libxft-dev zlib1g-dev libcjson-dev sudo tcl tk libical3 libedit2 xz-utils)

SLURM_PACKAGES=(slurm-wlm slurmctld slurmd slurm-client munge)
SSH_PACKAGES=(openssh-server openssh-client rsync)
SGE_PACKAGES=(gridengine-master gridengine-exec gridengine-client)
# lxm3 itself runs on the "login node" as the test user under the system Python,
# which packages with pip; unzip unpacks archives in job scripts; ss (iproute2)
# tells whether a port is free.
OTHER_PACKAGES=(python3 python3-pip unzip iproute2)

# The environment that points the schedulers' commands at the test bed's
# clusters, as NAME=VALUE words (sshd's SetEnv, the ~/.bashrc block, the env file).
cluster_env() {
  printf '%s\n' "SLURM_CONF=$SLURM_CONF" "SGE_ROOT=$SGE_ROOT" "SGE_CELL=$SGE_CELL" \
    "SGE_QMASTER_PORT=$SGE_QMASTER_PORT" "SGE_EXECD_PORT=$SGE_EXECD_PORT"
}

# --- logging, errors, timing -------------------------------------------------
TB_NAME=${TB_NAME:-testbed}
log() { printf '[%s %(%H:%M:%S)T] %s\n' "$TB_NAME" -1 "$*"; }
now() { printf '%s' "$EPOCHREALTIME"; }
secs() { awk -v a="$1" -v b="${2:-$EPOCHREALTIME}" 'BEGIN { printf "%.1f", b - a }'; }

dump_logs() {
  local f
  for f in "$MUNGE_LOG" "$SLURM_LOG_DIR/slurmctld.log" "$SLURM_LOG_DIR/slurmd.log" \
           "$SSHD_LOG" "$SGE_SPOOL/qmaster/messages" "$SGE_SPOOL"/execd/*/messages \
           "$PBS_LOG" "$PBS_SSHD_LOG" "$PBS_HOME_DIR"/{server,sched,comm,mom}_logs/"$(date +%Y%m%d)"; do
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

# The test bed cannot run here as configured (a port, user or directory of
# someone else's): say so and what to change, and stop. Nothing was touched.
refuse() {
  trap - ERR
  printf '[%s] REFUSED: %s\n' "$TB_NAME" "$*" >&2
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

# Grid Engine daemons write their pid files themselves, in the spool.
sge_qmaster_pid() { running_pid "$PID_QMASTER" sge_qmaster; }
sge_execd_pid() {
  local f
  for f in "$SGE_SPOOL"/execd/*/execd.pid; do
    running_pid "$f" sge_execd && return 0
  done
  return 1
}

# --- ports ---------------------------------------------------------------------
# What listens on TCP port $1 (any address), as ss prints it; empty if nothing.
port_listeners() { ss -Hltnp "sport = :$1" 2>/dev/null || true; }

# Refuse to start a daemon on port $1 when another program already listens
# there: that program is not the test bed's (its own daemon would have been
# found through its pid file), so it is left alone and the test bed moves.
require_free_port() {
  local port=$1 setting=$2 what=$3 who
  who=$(port_listeners "$port")
  [[ -z $who ]] && return 0
  who=$(grep -o 'users:(([^)]*' <<<"$who" | head -n 1 | sed 's/users:((//')
  refuse "port $port, which the test bed's $what would use, is taken by a program the test bed did not start (${who:-unknown process}); the test bed leaves it alone: set $setting to a free port"
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

# Print file $1 without the lines from $2 to $3 (a marked block), if it exists.
without_block() {
  [[ -f $1 ]] || return 0
  awk -v b="$2" -v e="$3" '$0 == b { skip = 1; next } skip && $0 == e { skip = 0; next } !skip' "$1"
}

# Replace the marked block ($2..$3) of file $1 with stdin, placed first ($6 =
# top) or last ($6 = bottom); stdin empty: remove it. The rest of the file,
# its owner and mode stay as they are; a new file gets owner $4 and mode $5.
# Returns 0 if the file changed.
replace_block() {
  local file=$1 begin=$2 end=$3 owner=$4 mode=$5 where=$6 body
  body=$(cat)
  [[ -f $file || -n $body ]] || return 1
  if [[ -f $file ]]; then owner=$(stat -c %U "$file"); mode=$(stat -c %a "$file"); fi
  {
    if [[ $where == bottom ]]; then without_block "$file" "$begin" "$end"; fi
    if [[ -n $body ]]; then printf '%s\n' "$begin" "$body" "$end"; fi
    if [[ $where == top ]]; then without_block "$file" "$begin" "$end"; fi
  } | write_if_changed "$file" "$mode" "$owner"
}

home_of() { getent passwd "$1" | cut -d: -f6; }
gecos_of() { getent passwd "$1" | cut -d: -f5; }

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
