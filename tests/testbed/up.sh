#!/usr/bin/env bash
# up.sh - bring up the lxm3 integration test bed on this machine, as a guest:
#   * Slurm (munged, slurmctld, slurmd): one node, one partition;
#   * Grid Engine (sge_qmaster, sge_execd): one host, queue all.q, PE smp;
#   * an OpenSSH server on 127.0.0.1 only, plus rsync;
#   * its own unprivileged user (lxm3tb), reachable as
#     `ssh -p 6922 lxm3tb@localhost` with the client user's key and strict host
#     key checking, whose commands reach the test bed's clusters.
# Then it checks that all of it answers, through ssh as that user, and writes
# $TB_ROOT/testbed.env for the test suite (tests/testbed_env.py reads it).
#
# Every daemon, configuration file, key, spool and log is the test bed's own,
# under $TB_ROOT (/var/lib/lxm3-testbed), on ports of its own: a Slurm, munge,
# Grid Engine or sshd already on the machine is never edited, restarted or
# signalled (see lib.sh). Where the test bed cannot run beside them (a port,
# the user name, its directory or env file taken), it stops before changing
# anything and says which setting to change.
#
# Debian 12, run as root, no systemd needed: each daemon is started directly
# and tracked by its pid file. Idempotent: live daemons are kept and only
# restarted when their configuration changed. Exit 0 means ready.
# Settings (environment variables) are listed in lib.sh and README.md;
# TESTBED_SELFTEST=1 also runs the end-to-end jobs of selftest.sh (~15 s).
set -Eeuo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TB_NAME=testbed-up
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"
# shellcheck source-path=SCRIPTDIR source=pbs.sh
. "$HERE/pbs.sh"
trap 'on_err $LINENO "$BASH_COMMAND"' ERR
require_root

T_START=$(now)
HOST=$(hostname -s)
WORK=$(mktemp -d /tmp/lxm3-testbed-up.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

# =============================================================================
# 0. The test bed's directory: created, or recognised by its mark.
# =============================================================================
if [[ -d $TB_ROOT && ! -e $ROOT_MARK && -n $(ls -A "$TB_ROOT") ]]; then
  refuse "$TB_ROOT exists, is not empty and is not the test bed's (no $ROOT_MARK): set TESTBED_ROOT to another directory"
fi
# The env file is read by the test suite: one describing another test bed
# (another root, or written by an up.sh from before the test bed was a guest)
# may be in use by someone else's tests.
if [[ -f $TB_ENV_FILE ]] && ! grep -qxF "LXM3_TESTBED_ROOT=$TB_ROOT" "$TB_ENV_FILE"; then
  refuse "$TB_ENV_FILE describes another test bed ($(grep -E '^LXM3_TESTBED_(ROOT|SSH_PORT)=' "$TB_ENV_FILE" | paste -sd' ' - || true)); set TESTBED_ENV_FILE to another path, or remove the file if that test bed is gone"
fi
[[ -d $TB_ROOT ]] || install -d -m 0755 "$TB_ROOT"
[[ -e $ROOT_MARK ]] ||
  echo "Everything in this directory belongs to lxm3's tests/testbed/up.sh; 'down.sh --purge' removes it." > "$ROOT_MARK"

# =============================================================================
# 1. Packages: one apt run for everything, skipped when all are installed.
# =============================================================================
PACKAGES=("${SLURM_PACKAGES[@]}" "${SSH_PACKAGES[@]}" "${SGE_PACKAGES[@]}" "${OTHER_PACKAGES[@]}")
missing=()
for p in "${PACKAGES[@]}"; do pkg_installed "$p" || missing+=("$p"); done
if ((${#missing[@]})); then
  log "installing ${missing[*]} (log: $APT_LOG)"
  # gridengine asks debconf questions; these are the answers a fresh machine
  # gets (configure the packaged cell "default" with this host as master).
  # That cell is the package's, not the test bed's: it runs its own below.
  if ! pkg_installed gridengine-common; then
    debconf-set-selections <<EOF
gridengine-common shared/gridengineconfig boolean true
gridengine-common shared/gridenginecell string default
gridengine-common shared/gridenginemaster string $(hostname)
gridengine-client shared/gridengineconfig boolean true
gridengine-client shared/gridenginecell string default
gridengine-client shared/gridenginemaster string $(hostname)
EOF
  fi
  apt_get update
  # --no-install-recommends matters: openssh-server recommends libpam-systemd,
  # which pulls in systemd. gridengine still brings bsd-mailx, exim4 and tcsh.
  apt_get install -y --no-install-recommends "${PACKAGES[@]}"
  PKG_NOTE="installed ${#missing[@]} package(s)"
else
  PKG_NOTE="apt skipped"
fi
T_PKG=$(now)
SLURM_VERSION=$(slurmd -V | awk '{print $2}')   # works before slurm.conf exists
SGE_VERSION=$(dpkg-query -W -f='${Version}' gridengine-master)
SGE_VERSION=${SGE_VERSION%%+*}
log "packages ready ($PKG_NOTE) in $(secs "$T_START" "$T_PKG") s: slurm $SLURM_VERSION, gridengine $SGE_VERSION, $(ssh -V 2>&1)"

# =============================================================================
# 2. The test bed's user, the client's ssh key, and the user's environment.
# =============================================================================
if ! id -u "$TB_USER" >/dev/null 2>&1; then
  log "creating user $TB_USER"
  # Tolerate another provisioning step creating the same user at this moment.
  useradd --create-home --shell /bin/bash --comment "$USER_MARK" "$TB_USER" 2>"$WORK/useradd.err" ||
    id -u "$TB_USER" >/dev/null 2>&1 || die "useradd $TB_USER: $(cat "$WORK/useradd.err")"
fi
# An account someone else made is not changed (its ~/.bashrc, its jobs).
[[ $(gecos_of "$TB_USER") == "$USER_MARK" ]] ||
  refuse "user $TB_USER exists but was not created by the test bed (its GECOS field is '$(gecos_of "$TB_USER")', not '$USER_MARK'); the test bed changes no account of someone else's: set TESTBED_USER to a name that is not taken"
# Grid Engine rejects jobs from uids below its min_uid (1000): "your user id
# 0 is lower than minimum user id 1000 of cluster configuration".
(($(id -u "$TB_USER") >= 1000)) || die "uid of $TB_USER is $(id -u "$TB_USER"); Grid Engine needs >= 1000"
TB_HOME=$(home_of "$TB_USER")
TB_GROUP=$(id -gn "$TB_USER")
[[ -d $TB_HOME ]] || install -d -o "$TB_USER" -g "$TB_GROUP" -m 0755 "$TB_HOME"

getent passwd "$TB_CLIENT" >/dev/null || die "TESTBED_CLIENT_USER '$TB_CLIENT' does not exist"
CLIENT_HOME=$(home_of "$TB_CLIENT")
[[ -d $CLIENT_HOME/.ssh ]] || install -d -o "$TB_CLIENT" -g "$(id -gn "$TB_CLIENT")" -m 0700 "$CLIENT_HOME/.ssh"
CLIENT_KEY=$CLIENT_HOME/.ssh/id_ed25519       # a default name: plain `ssh` finds it
CLIENT_KNOWN_HOSTS=$CLIENT_HOME/.ssh/known_hosts
if [[ ! -f $CLIENT_KEY ]]; then
  log "creating ssh key $CLIENT_KEY"
  runuser -u "$TB_CLIENT" -- ssh-keygen -q -t ed25519 -N '' -C "$TB_CLIENT@$HOST-lxm3-testbed" -f "$CLIENT_KEY"
elif [[ ! -f $CLIENT_KEY.pub ]]; then
  runuser -u "$TB_CLIENT" -- ssh-keygen -y -f "$CLIENT_KEY" > "$CLIENT_KEY.pub"
fi
# The key is authorized in the test bed's sshd configuration, not in the
# user's home (AuthorizedKeysFile $SSH_AUTH_DIR/%u).
install -d -m 0755 "$SSH_DIR" "$SSH_AUTH_DIR"
write_if_changed "$SSH_AUTH_DIR/$TB_USER" 0644 < "$CLIENT_KEY.pub" || true

# The commands the user runs must reach the test bed's clusters, not the
# site's. sshd's SetEnv (step 5) gives every ssh session the variables. But a
# login shell reads /etc/profile, whose /etc/profile.d may set a site's
# SGE_ROOT/SGE_CELL, and Grid Engine starts jobs as login shells (sh -l): the
# block at the end of ~/.profile, read after /etc/profile, sets them again.
# The block at the top of ~/.bashrc (before its "not interactive" return) is
# for bash started otherwise, e.g. `runuser -u USER bash`.
for rc in "$TB_HOME/.profile:bottom" "$TB_HOME/.bashrc:top"; do
  cluster_env | sed 's/^/export /' |
    replace_block "${rc%:*}" "$BASHRC_BEGIN" "$BASHRC_END" "$TB_USER" 0644 "${rc##*:}" || true
done

# =============================================================================
# 3. munge and Slurm. The daemons are started here; waiting for the node to
#    be idle happens in step 6, so Grid Engine and ssh start meanwhile.
# =============================================================================
getent passwd munge >/dev/null || die "user munge does not exist (munge package broken?)"
# munged checks that its key's directories are not writable by others; the
# socket in the same directory must be reachable by every user (0755).
[[ -d $MUNGE_DIR ]] || install -d -o munge -g munge -m 0755 "$MUNGE_DIR"
if [[ ! -s $MUNGE_KEY ]]; then
  log "creating the test bed's munge key $MUNGE_KEY"
  mungekey --create --keyfile="$MUNGE_KEY" --force
fi
chown munge:munge "$MUNGE_KEY"
chmod 0400 "$MUNGE_KEY"
if ! running_pid "$PID_MUNGED" munged >/dev/null; then
  rm -f "$PID_MUNGED"
  runuser -u munge -- /usr/sbin/munged --socket="$MUNGE_SOCKET" --key-file="$MUNGE_KEY" \
    --pid-file="$PID_MUNGED" --log-file="$MUNGE_LOG" --seed-file="$MUNGE_SEED"
  pid=$(wait_pidfile "$PID_MUNGED" munged) || die "munged did not start"
  log "munged started (pid $pid, socket $MUNGE_SOCKET)"
fi
munge -n -S "$MUNGE_SOCKET" | unmunge -S "$MUNGE_SOCKET" >/dev/null ||
  die "munge round trip through $MUNGE_SOCKET (munge -n | unmunge) failed"

getent passwd slurm >/dev/null || die "user slurm does not exist (slurm packages broken?)"
install -d -m 0755 "$SLURM_DIR" "$SLURM_SPOOL"
install -d -o slurm -g slurm -m 0755 "$SLURM_STATE" "$SLURM_LOG_DIR"

# Hardware as slurmd sees it, e.g. "NodeName=vm CPUs=2 Boards=1
# SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24103".
hw=$(slurmd -C 2>/dev/null | head -n 1 || true)
hwval() { local v; v=$(grep -oE "(^| )$1=[0-9]+" <<<"$hw" | cut -d= -f2 || true); echo "${v:-$2}"; }
cpus=$(hwval CPUs "$(nproc)")
mem=$(hwval RealMemory $(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024)))
mem=$((mem * 90 / 100))   # leave the OS some room, or slurmd drains the node
if [[ -n $TB_SLURM_CPUS && $TB_SLURM_CPUS != "$cpus" ]]; then
  # More (or fewer) CPUs than the hardware: slurmd must trust slurm.conf.
  cpus=$TB_SLURM_CPUS
  node_hw="CPUs=$cpus"
  overrides="SlurmdParameters=config_overrides"
else
  node_hw="CPUs=$cpus Boards=1 SocketsPerBoard=$(hwval SocketsPerBoard 1) CoresPerSocket=$(hwval CoresPerSocket "$cpus") ThreadsPerCore=$(hwval ThreadsPerCore 1)"
  overrides="#SlurmdParameters=config_overrides"
fi

if write_if_changed "$SLURM_CONF" 0644 <<EOF
# Written by lxm3 tests/testbed/up.sh: the test bed's own one-node Slurm.
# Clients find it through SLURM_CONF=$SLURM_CONF. Edits are overwritten.
ClusterName=$SLURM_CLUSTER
# Name(address) and NodeAddr=127.0.0.1 keep name resolution out of the way.
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$TB_SLURMCTLD_PORT
SlurmdPort=$TB_SLURMD_PORT
SlurmUser=slurm
SlurmdUser=root
# Its own munged: both the RPC authentication and the job credentials
# (cred/munge reads the socket from AuthInfo too) go through this socket.
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$SLURM_STATE
SlurmdSpoolDir=$SLURM_SPOOL
SlurmctldPidFile=$PID_SLURMCTLD
SlurmdPidFile=$PID_SLURMD
SlurmctldLogFile=$SLURM_LOG_DIR/slurmctld.log
SlurmdLogFile=$SLURM_LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroup plugins (nothing delegates cgroups without systemd): jobs are not
# confined, memory limits are not enforced, a detached child outlives its job.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# No slurmdbd, so no sacct. Each finished job or task is appended to JobCompLoc.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$SLURM_LOG_DIR/jobcomp.log
SchedulerType=sched/backfill
# Default batch_sched_delay=3 starts array tasks in waves 3 s apart.
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=256
# Reject at submission what the partition can never run (else PENDING forever).
EnforcePartLimits=ALL
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
# Largest array index is MaxArraySize-1.
MaxArraySize=$TB_SLURM_MAX_ARRAY_SIZE
MaxJobCount=10000
# Finished jobs stay visible to squeue -t all / scontrol show job this long (s).
MinJobAge=$TB_SLURM_MIN_JOB_AGE
KillWait=5
InactiveLimit=0
SlurmctldTimeout=120
SlurmdTimeout=300
$overrides
# A node name of its own (slurmd -N), on this host, beside any site's node.
NodeName=$SLURM_NODE NodeHostname=$HOST NodeAddr=127.0.0.1 $node_hw RealMemory=$mem State=UNKNOWN
PartitionName=$SLURM_PARTITION Nodes=$SLURM_NODE Default=YES MaxTime=INFINITE State=UP
EOF
then
  log "wrote $SLURM_CONF (MaxArraySize=$TB_SLURM_MAX_ARRAY_SIZE MinJobAge=$TB_SLURM_MIN_JOB_AGE, $node_hw RealMemory=$mem)"
  stop_daemon "$PID_SLURMD" slurmd          # a changed slurm.conf is applied by a restart
  stop_daemon "$PID_SLURMCTLD" slurmctld
fi
if ! running_pid "$PID_SLURMCTLD" slurmctld >/dev/null; then
  require_free_port "$TB_SLURMCTLD_PORT" TESTBED_SLURMCTLD_PORT slurmctld
  rm -f "$PID_SLURMCTLD"
  /usr/sbin/slurmctld -f "$SLURM_CONF"
  pid=$(wait_pidfile "$PID_SLURMCTLD" slurmctld) || die "slurmctld did not start"
  log "slurmctld started (pid $pid, port $TB_SLURMCTLD_PORT)"
fi
for ((i = 0; i < TB_TIMEOUT * 4; i++)); do
  scontrol ping 2>/dev/null | grep -q 'is UP' && break
  sleep 0.25
done
scontrol ping 2>/dev/null | grep -q 'is UP' || die "slurmctld does not answer 'scontrol ping'"
if ! running_pid "$PID_SLURMD" slurmd >/dev/null; then
  require_free_port "$TB_SLURMD_PORT" TESTBED_SLURMD_PORT slurmd
  rm -f "$PID_SLURMD"
  /usr/sbin/slurmd -f "$SLURM_CONF" -N "$SLURM_NODE"
  pid=$(wait_pidfile "$PID_SLURMD" slurmd) || die "slurmd did not start"
  log "slurmd started (pid $pid, port $TB_SLURMD_PORT, node $SLURM_NODE)"
fi
T_SLURM=$(now)

# =============================================================================
# 4. Grid Engine: its own SGE_ROOT, cell, spool and ports.
# =============================================================================
id sgeadmin >/dev/null 2>&1 || die "user sgeadmin does not exist (gridengine-common postinst failed?)"
# SGE_ROOT: links to the packaged programs, as the package's own
# /var/lib/gridengine has them, and the cell.
SGE_ARCH=$(/usr/share/gridengine/util/arch)
install -d -m 0755 "$SGE_ROOT" "$SGE_ROOT/bin" "$SGE_ROOT/lib" "$SGE_ROOT/utilbin"
for d in bin lib utilbin; do ln -sfn "$SGE_LIB" "$SGE_ROOT/$d/$SGE_ARCH"; done
ln -sfn /usr/share/gridengine/util "$SGE_ROOT/util"
install -d -o sgeadmin -g sgeadmin -m 0755 "$SGE_ROOT/$SGE_CELL" "$SGE_COMMON" \
  "$SGE_SPOOL" "$SGE_SPOOL/qmaster" "$SGE_SPOOL/qmaster/job_scripts" "$SGE_SPOOL/spooldb" "$SGE_SPOOL/execd"
install -d -m 1777 "$SGE_TMPDIR"
sge_changed=0
write_if_changed "$SGE_COMMON/bootstrap" 0644 sgeadmin <<EOF && sge_changed=1
Version: 6.2
admin_user              sgeadmin
default_domain          none
ignore_fqdn             false
spooling_method         berkeleydb
spooling_lib            libspoolb
spooling_params         $SGE_SPOOL/spooldb
binary_path             /usr/sbin
qmaster_spool_dir       $SGE_SPOOL/qmaster
security_mode           none
listener_threads        2
worker_threads          2
scheduler_threads       1
EOF
# For people: `. $SGE_COMMON/settings.sh` points a shell at this cell.
{ cluster_env | grep '^SGE_' | sed 's/^\([^=]*\)=\(.*\)/\1=\2; export \1/'
  echo "SGE_ARCH=$SGE_ARCH; export SGE_ARCH"; } |
  write_if_changed "$SGE_COMMON/settings.sh" 0644 sgeadmin || true
if [[ ! -e $SGE_SPOOL/spooldb/sge ]]; then
  # What the package's init_cluster does for its cell, for this one: the
  # spool, then the global configuration (the packaged defaults with this
  # cell's execd spool and gid range), complexes, user sets and the manager.
  log "initialising the Grid Engine cell $SGE_CELL in $SGE_ROOT"
  install -d -o sgeadmin -g sgeadmin -m 0700 "$SGE_SPOOL/init"
  sed -e "s@^execd_spool_dir .*@execd_spool_dir        $SGE_SPOOL/execd@" \
      -e "s@^gid_range .*@gid_range              $SGE_GID_RANGE@" \
      /usr/share/gridengine/default-configuration > "$SGE_SPOOL/init/configuration"
  chown sgeadmin:sgeadmin "$SGE_SPOOL/init/configuration"
  as_sgeadmin() { runuser -u sgeadmin -- "$@" > "$WORK/sge-init.out" 2>&1 || die "$* (as sgeadmin): $(cat "$WORK/sge-init.out")"; }
  as_sgeadmin "$SGE_LIB/spoolinit" berkeleydb libspoolb "$SGE_SPOOL/spooldb" init
  as_sgeadmin "$SGE_LIB/spooldefaults" configuration "$SGE_SPOOL/init/configuration"
  as_sgeadmin "$SGE_LIB/spooldefaults" complexes /usr/share/gridengine/util/resources/centry
  as_sgeadmin "$SGE_LIB/spooldefaults" usersets /usr/share/gridengine/util/resources/usersets
  as_sgeadmin "$SGE_LIB/spooldefaults" managers sgeadmin
  rm -rf "$SGE_SPOOL/init"
fi

# Host names. SGE's commlib maps each peer address back to a name. Where the
# host name resolves to 127.0.0.1 and /etc/hosts lists "localhost" first for
# that address, qmaster calls itself "localhost" and rejects every client:
#   commlib error: access denied (client IP resolved to host name "localhost".
#   This is not identical to clients host name "vm")
# The fix stays inside the cell: $SGE_COMMON/host_aliases maps those names to
# the host name, computed with SGE's own resolver utilities (the alias file is
# bypassed by pointing them at a cell that does not exist).
sge_resolve() { SGE_CELL=__no_alias_file__ "$SGE_LIB/$1" "${@:2}"; }
SGE_HOST=$(sge_resolve gethostname -name || true)
[[ -n $SGE_HOST ]] || die "SGE cannot resolve this host's name ($(hostname))"
addrs=$(sge_resolve gethostname -all | sed -n 's/^Host Address(es): *//p')
aliases=()
for ip in $addrs; do
  rev=$(sge_resolve gethostbyaddr -name "$ip" 2>/dev/null || true)
  if [[ -n $rev && $rev != "$SGE_HOST" && " ${aliases[*]} " != *" $rev "* ]]; then aliases+=("$rev"); fi
done
if ((${#aliases[@]})); then
  write_if_changed "$SGE_COMMON/host_aliases" 0644 sgeadmin <<<"$SGE_HOST ${aliases[*]}" && sge_changed=1
elif [[ -e $SGE_COMMON/host_aliases ]]; then
  rm -f "$SGE_COMMON/host_aliases"
  sge_changed=1
fi
write_if_changed "$SGE_COMMON/act_qmaster" 0644 sgeadmin <<<"$SGE_HOST" && sge_changed=1
# Daemons that read an older bootstrap or host names: restart them.
if ((sge_changed)); then
  log "SGE cell $SGE_CELL: host $SGE_HOST (aliases: ${aliases[*]:-none})"
  if pid=$(sge_execd_pid); then log "restarting sge_execd (cell files changed)"; stop_pid "$pid" sge_execd 30; fi
  if pid=$(sge_qmaster_pid); then log "restarting sge_qmaster (cell files changed)"; stop_pid "$pid" sge_qmaster 30; fi
fi

# Start a Grid Engine daemon ($1 = sge_qmaster|sge_execd) for this cell: the
# packaged wrappers honour SGE_ROOT/SGE_CELL and the daemons the ports, all
# exported by lib.sh. They daemonize and drop to sgeadmin themselves; setsid
# and closed stdio detach them from us.
sge_start() {
  (cd / && setsid "/usr/sbin/$1" </dev/null >/dev/null 2>&1) || die "$1 failed to start"
  local i pid
  for ((i = 0; i < TB_TIMEOUT * 5; i++)); do
    pid=$("${1}_pid") && { log "$1 started (pid $pid, port $2)"; return 0; }
    sleep 0.2
  done
  die "$1 did not stay up"
}
if ! sge_qmaster_pid >/dev/null; then
  require_free_port "$SGE_QMASTER_PORT" TESTBED_SGE_QMASTER_PORT sge_qmaster
  sge_start sge_qmaster "$SGE_QMASTER_PORT"
fi
for ((i = 0; i < TB_TIMEOUT * 4; i++)); do
  qconf -sh >/dev/null 2>&1 && break
  sleep 0.25
done
qconf -sh >/dev/null 2>&1 || die "sge_qmaster does not answer qconf -sh"

# Configuration: each step compares and writes only what differs.
# qconf reports success on stderr; keep its output only for errors.
qconf_set() { local out; out=$(qconf "$@" 2>&1) || die "qconf $*: $out"; }
grep -qxF "$SGE_HOST" <<<"$(qconf -sh 2>/dev/null)" || qconf_set -ah "$SGE_HOST"   # admin host
grep -qxF "$SGE_HOST" <<<"$(qconf -ss 2>/dev/null)" || qconf_set -as "$SGE_HOST"   # submit host

# Set "key value" in SGE configuration file $1 (continuation lines joined first).
sge_set() {
  awk -v k="$2" -v v="$3" '
    { line = $0
      while (line ~ /\\$/ && (getline nxt) > 0) { sub(/\\$/, "", line); sub(/^[ \t]+/, "", nxt); line = line nxt }
      split(line, f, /[ \t]+/)
      if (f[1] == k) { printf "%-28s %s\n", k, v; found = 1 } else print line }
    END { if (!found) printf "%-28s %s\n", k, v }' "$1" > "$1.new" && mv "$1.new" "$1"
}
# A configuration file reduced to a canonical form, for comparisons.
sge_norm() {
  awk '{ line = $0
    while (line ~ /\\$/ && (getline nxt) > 0) { sub(/\\$/, "", line); sub(/^[ \t]+/, "", nxt); line = line nxt }
    print line }' "$1" | grep -v '^#' | tr -s ' \t' ' ' | sort
}

# Global configuration. qconf -Mconf takes the configuration's name from the
# file name, hence .../global.
#  - accounting flushed at once: qacct sees a job as soon as it left qstat;
#  - min_uid/min_gid 1000: root cannot submit (the packaged default, explicit);
#  - max_aj_tasks: the most tasks an array job may have;
#  - execd_spool_dir and gid_range: this cell's own (see lib.sh).
mkdir -p "$WORK/conf"
qconf -sconf global | grep -v '^#' > "$WORK/global.orig"
cp "$WORK/global.orig" "$WORK/conf/global"
sge_set "$WORK/conf/global" reporting_params "accounting=true reporting=false flush_time=00:00:01 joblog=false sharelog=00:00:00 accounting_flush_time=00:00:00"
sge_set "$WORK/conf/global" min_uid 1000
sge_set "$WORK/conf/global" min_gid 1000
sge_set "$WORK/conf/global" max_aj_tasks "$TB_SGE_MAX_AJ_TASKS"
sge_set "$WORK/conf/global" execd_spool_dir "$SGE_SPOOL/execd"
sge_set "$WORK/conf/global" gid_range "$SGE_GID_RANGE"
if ! cmp -s <(sge_norm "$WORK/global.orig") <(sge_norm "$WORK/conf/global"); then
  qconf_set -Mconf "$WORK/conf/global"
  log "SGE global configuration updated (max_aj_tasks $TB_SGE_MAX_AJ_TASKS)"
fi

# Scheduler: every second instead of every 15 s, no load-based throttling.
qconf -ssconf > "$WORK/sconf"
sed -e 's/^schedule_interval .*/schedule_interval                 0:0:1/' \
    -e 's/^flush_submit_sec .*/flush_submit_sec                  1/' \
    -e 's/^flush_finish_sec .*/flush_finish_sec                  1/' \
    -e 's/^job_load_adjustments .*/job_load_adjustments              NONE/' \
    -e 's/^load_adjustment_decay_time .*/load_adjustment_decay_time        0:0:0/' \
    "$WORK/sconf" > "$WORK/sconf.new"
cmp -s "$WORK/sconf" "$WORK/sconf.new" || qconf_set -Msconf "$WORK/sconf.new"

# Execution host.
if ! qconf -se "$SGE_HOST" >/dev/null 2>&1; then
  cat > "$WORK/exechost" <<EOF
hostname              $SGE_HOST
load_scaling          NONE
complex_values        NONE
user_lists            NONE
xuser_lists           NONE
projects              NONE
xprojects             NONE
usage_scaling         NONE
report_variables      NONE
EOF
  qconf_set -Ae "$WORK/exechost"
fi

# Parallel environment smp: all slots of a job on one host (qsub -pe smp N).
cat > "$WORK/pe" <<EOF
pe_name            $SGE_PE
slots              9999
user_lists         NONE
xuser_lists        NONE
start_proc_args    NONE
stop_proc_args     NONE
allocation_rule    \$pe_slots
control_slaves     FALSE
job_is_first_task  TRUE
urgency_slots      min
accounting_summary FALSE
qsort_args         NONE
EOF
if qconf -sp "$SGE_PE" > "$WORK/pe.cur" 2>/dev/null; then
  cmp -s <(sge_norm "$WORK/pe.cur") <(sge_norm "$WORK/pe") || qconf_set -Mp "$WORK/pe"
else
  qconf_set -Ap "$WORK/pe"
fi

# Queue all.q: this host, one slot per CPU, PE smp, no limits.
#  - load_thresholds NONE: other work on a 2-core CI machine pushes the load
#    above the default np_load_avg=1.75, which would stop scheduling (state a).
#  - shell /bin/sh with posix_compliant: a job script's #! line is ignored and
#    it runs under dash unless submitted with -S /bin/bash.
#  - tmpdir of its own: a site's job with the same id and task would get the
#    same /tmp/<job>.<task>.all.q.
cat > "$WORK/queue" <<EOF
qname                 $SGE_QUEUE
hostlist              $SGE_HOST
seq_no                0
load_thresholds       NONE
suspend_thresholds    NONE
nsuspend              1
suspend_interval      00:05:00
priority              0
min_cpu_interval      00:05:00
processors            UNDEFINED
qtype                 BATCH INTERACTIVE
ckpt_list             NONE
pe_list               $SGE_PE
rerun                 FALSE
slots                 $TB_SGE_SLOTS
tmpdir                $SGE_TMPDIR
shell                 /bin/sh
prolog                NONE
epilog                NONE
shell_start_mode      posix_compliant
starter_method        NONE
suspend_method        NONE
resume_method         NONE
terminate_method      NONE
notify                00:00:60
owner_list            NONE
user_lists            NONE
xuser_lists           NONE
subordinate_list      NONE
complex_values        NONE
projects              NONE
xprojects             NONE
calendar              NONE
initial_state         default
s_rt                  INFINITY
h_rt                  INFINITY
s_cpu                 INFINITY
h_cpu                 INFINITY
s_fsize               INFINITY
h_fsize               INFINITY
s_data                INFINITY
h_data                INFINITY
s_stack               INFINITY
h_stack               INFINITY
s_core                INFINITY
h_core                INFINITY
s_rss                 INFINITY
h_rss                 INFINITY
s_vmem                INFINITY
h_vmem                INFINITY
EOF
if qconf -sq "$SGE_QUEUE" > "$WORK/queue.cur" 2>/dev/null; then
  cmp -s <(sge_norm "$WORK/queue.cur") <(sge_norm "$WORK/queue") || qconf_set -Mq "$WORK/queue"
else
  qconf_set -Aq "$WORK/queue"
fi

if ! sge_execd_pid >/dev/null; then
  require_free_port "$SGE_EXECD_PORT" TESTBED_SGE_EXECD_PORT sge_execd
  sge_start sge_execd "$SGE_EXECD_PORT"
fi
T_SGE=$(now)

# =============================================================================
# 5. sshd on 127.0.0.1, with its own host key, and the client's known_hosts.
#    Host key checking is never disabled: the key is recorded in a marked
#    block of the client's known_hosts.
# =============================================================================
if [[ ! -s $SSH_HOST_KEY ]]; then
  rm -f "$SSH_HOST_KEY" "$SSH_HOST_KEY.pub"
  ssh-keygen -q -t ed25519 -N '' -C "lxm3 test bed sshd ($TB_ROOT)" -f "$SSH_HOST_KEY"
fi
[[ -d /run/sshd ]] || install -d -m 0755 /run/sshd  # sshd's privilege separation directory
sshd_changed=0
write_if_changed "$SSHD_CONF" 0644 <<EOF && sshd_changed=1
# Written by lxm3 tests/testbed/up.sh: the test bed's own loopback-only sshd.
Port $TB_SSH_PORT
ListenAddress 127.0.0.1
HostKey $SSH_HOST_KEY
PidFile $PID_SSHD
# Only the test bed's user, with the keys the test bed authorized.
AllowUsers $TB_USER
AuthorizedKeysFile $SSH_AUTH_DIR/%u
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
# UsePAM must stay on: useradd leaves the password locked ("!"), and without
# PAM sshd refuses even key logins to a locked account.
UsePAM yes
# Every session's commands reach the test bed's clusters, not the site's.
SetEnv $(cluster_env | paste -sd' ' -)
X11Forwarding no
PrintMotd no
AcceptEnv LANG LC_*
# The default 10:30:100 starts dropping connections at random once 10 are
# unauthenticated at once; test suites connect in parallel.
MaxStartups 200:30:400
Subsystem sftp /usr/lib/openssh/sftp-server
EOF
/usr/sbin/sshd -t -f "$SSHD_CONF" || die "sshd rejects $SSHD_CONF"
((sshd_changed)) && stop_daemon "$PID_SSHD" sshd
if ! running_pid "$PID_SSHD" sshd >/dev/null; then
  require_free_port "$TB_SSH_PORT" TESTBED_SSH_PORT sshd
  rm -f "$PID_SSHD"
  /usr/sbin/sshd -f "$SSHD_CONF" -E "$SSHD_LOG"
  pid=$(wait_pidfile "$PID_SSHD" sshd) || die "sshd did not start"
  log "sshd started (pid $pid, 127.0.0.1:$TB_SSH_PORT)"
fi
# known_hosts entries for a port other than 22 read "[localhost]:PORT key".
read -r ktype kdata _ < "$SSH_HOST_KEY.pub"
printf '[%s]:%s %s %s\n' localhost "$TB_SSH_PORT" "$ktype" "$kdata" 127.0.0.1 "$TB_SSH_PORT" "$ktype" "$kdata" |
  replace_block "$CLIENT_KNOWN_HOSTS" "$KNOWN_HOSTS_BEGIN" "$KNOWN_HOSTS_END" "$TB_CLIENT" 0644 bottom || true
T_SSH=$(now)

# =============================================================================
# 6. Wait until both schedulers can run jobs.
# =============================================================================
resumed=0
state=
for ((i = 0; i < TB_TIMEOUT * 4; i++)); do
  state=$(sinfo -h -N -n "$SLURM_NODE" -o %t 2>/dev/null | head -n 1 || true)
  case $state in
    idle | mix | alloc) break ;;
    drain | drng | down)  # slurmd answers but the node is held: resume it once
      if ((!resumed && i > 20)); then
        log "node $SLURM_NODE is $state ($(scontrol show node "$SLURM_NODE" | grep -o 'Reason=.*' || true)); resuming"
        scontrol update NodeName="$SLURM_NODE" State=RESUME || true
        resumed=1
      fi ;;
  esac
  sleep 0.25
done
[[ $state =~ ^(idle|mix|alloc)$ ]] ||
  die "Slurm node $SLURM_NODE not ready after ${TB_TIMEOUT}s (sinfo state '${state:-none}'): $(scontrol show node "$SLURM_NODE" 2>&1 || true)"

# The queue instance has no state flags once execd has reported (u = not yet
# heard from; E = error, cleared with qmod -c; d = disabled, qmod -e).
qi=$SGE_QUEUE@$SGE_HOST
qstate=
for ((i = 0; i < TB_TIMEOUT * 4; i++)); do
  qstate=$(qstat -f -q "$qi" 2>/dev/null | awk -v q="$qi" '$1 == q { print (NF >= 6 ? $6 : "ok") }')
  [[ $qstate == ok ]] && break
  [[ $qstate == *E* ]] && { qmod -c "$qi" >/dev/null 2>&1 || true; }
  [[ $qstate == *d* ]] && { qmod -e "$qi" >/dev/null 2>&1 || true; }
  sleep 0.25
done
[[ $qstate == ok ]] || die "Grid Engine queue $qi not ready after ${TB_TIMEOUT}s (state '${qstate:-none}'): $(qstat -f 2>&1 || true)"
T_READY=$(now)

# =============================================================================
# 7. Readiness, the way the tests reach the schedulers: one ssh session as
#    the test user, strict host key checking, no password prompt possible.
# =============================================================================
SSH_OPTS=(-o BatchMode=yes -o StrictHostKeyChecking=yes -o ConnectTimeout=10 -p "$TB_SSH_PORT" -i "$CLIENT_KEY")
# One `bash -s` session, as lxm3 runs its commands there. It asks each daemon:
# sinfo slurmctld, `scontrol show slurmd` slurmd, qstat sge_qmaster, qping
# sge_execd (tests/testbed_env.py probes the same way); and it prints the
# cluster variables of the session and of login shells (`bash -l`, and
# `sh -l` as Grid Engine starts jobs).
check=$(runuser -u "$TB_CLIENT" -- ssh "${SSH_OPTS[@]}" "$TB_USER@$TB_SSH_HOST" \
  bash -s -- "$SGE_HOST" "$SGE_EXECD_PORT" 2>&1 <<'EOF'
show_env='echo "$SLURM_CONF $SGE_ROOT $SGE_CELL $SGE_QMASTER_PORT $SGE_EXECD_PORT"'
echo "user=$(id -un)"
echo "env=$(eval "$show_env")"
echo "login-env=$(bash -l -c "$show_env" </dev/null)"
echo "sh-login-env=$(sh -l -c "$show_env" </dev/null)"
echo "cluster=$(scontrol show config | awk '$1 == "ClusterName" {print $3}')"
echo "sinfo=$(sinfo -h -N -o %t)"
scontrol show slurmd >/dev/null && echo slurmd=ok
qstat -f >/dev/null && echo qstat=ok
qping -info "$1" "$2" execd 1 >/dev/null && echo execd=ok
true
EOF
) || die "ssh -p $TB_SSH_PORT $TB_USER@$TB_SSH_HOST (BatchMode, strict host key checking) failed: $check"
want_env="$SLURM_CONF $SGE_ROOT $SGE_CELL $SGE_QMASTER_PORT $SGE_EXECD_PORT"
for want in "user=$TB_USER" "env=$want_env" "login-env=$want_env" "sh-login-env=$want_env" "cluster=$SLURM_CLUSTER" slurmd=ok qstat=ok execd=ok; do
  grep -qxF "$want" <<<"$check" || die "readiness check through ssh: expected '$want' in: $check"
done
grep -qE '^sinfo=(idle|mix|alloc)' <<<"$check" || die "readiness check through ssh: sinfo says: $check"
T_CHECK=$(now)

# =============================================================================
# 7b. OpenPBS, after the others: its own complex and sshd in its own network
#     namespace (pbs.sh), checked by a small array through that sshd. Where
#     network namespaces are not permitted it is left out of the env file.
# =============================================================================
# A PBS that cannot be built or started is left out, not the whole test bed:
# Slurm and Grid Engine stay usable, the PBS tests fail (LXM3_REQUIRE_TESTBED=1)
# or skip, and up.sh exits 1 at the end. pbs_up runs in a subshell with set -e
# on (an `if` or `||` would turn it off inside) and hands back what it set.
PBS_UP=0
PBS_TIMES="pbs skipped"
PBS_FAILED=0
set +e
trap - ERR
(
  trap 'on_err $LINENO "$BASH_COMMAND"' ERR
  set -e
  pbs_up
  declare -p PBS_UP PBS_TIMES PBS_NOTE PBS_VERSION PBS_NODE_STATE 2>/dev/null > "$WORK/pbs.vars"
)
pbs_status=$?
trap 'on_err $LINENO "$BASH_COMMAND"' ERR
set -e
if ((pbs_status == 0)); then
  # shellcheck disable=SC1091
  . "$WORK/pbs.vars"
else
  PBS_FAILED=1
  PBS_NOTE="pbs FAILED (exit $pbs_status; the lines above say where): left out of the env file"
  log "$PBS_NOTE; Slurm, Grid Engine and ssh are up"
fi
T_PBS=$(now)

if [[ ${TESTBED_SELFTEST:-0} == 1 ]]; then
  bash "$HERE/selftest.sh" || die "selftest.sh failed"
  SELFTEST_NOTE="self-test $(secs "$T_PBS") s"
else
  SELFTEST_NOTE="self-test skipped"
fi

# =============================================================================
# 8. Describe the test bed for the test suite (tests/testbed_env.py).
# =============================================================================
cat > "$WORK/env" <<EOF
# lxm3 test bed, written by tests/testbed/up.sh; read by tests/testbed_env.py.
# KEY=VALUE lines, no quoting needed (and none used), so sh can source it too.
LXM3_TESTBED_UP_AT=$(date -u +%Y-%m-%dT%H:%M:%SZ)
LXM3_TESTBED_ROOT=$TB_ROOT
LXM3_TESTBED_SSH_USER=$TB_USER
LXM3_TESTBED_SSH_HOST=$TB_SSH_HOST
LXM3_TESTBED_SSH_PORT=$TB_SSH_PORT
LXM3_TESTBED_SSH_KEY=$CLIENT_KEY
LXM3_TESTBED_SSH_KNOWN_HOSTS=$CLIENT_KNOWN_HOSTS
LXM3_TESTBED_SSHD_LOG=$SSHD_LOG
LXM3_TESTBED_CLIENT_USER=$TB_CLIENT
LXM3_TESTBED_USER_HOME=$TB_HOME
LXM3_TESTBED_MUNGE_SOCKET=$MUNGE_SOCKET
LXM3_TESTBED_SLURM=1
LXM3_TESTBED_SLURM_VERSION=$SLURM_VERSION
LXM3_TESTBED_SLURM_CONF=$SLURM_CONF
LXM3_TESTBED_SLURM_CLUSTER=$SLURM_CLUSTER
LXM3_TESTBED_SLURMCTLD_PORT=$TB_SLURMCTLD_PORT
LXM3_TESTBED_SLURMD_PORT=$TB_SLURMD_PORT
LXM3_TESTBED_SLURM_PARTITION=$SLURM_PARTITION
LXM3_TESTBED_SLURM_NODE=$SLURM_NODE
LXM3_TESTBED_SLURM_CPUS=$cpus
LXM3_TESTBED_SLURM_MAX_ARRAY_SIZE=$TB_SLURM_MAX_ARRAY_SIZE
LXM3_TESTBED_SLURM_MIN_JOB_AGE=$TB_SLURM_MIN_JOB_AGE
LXM3_TESTBED_SGE=1
LXM3_TESTBED_SGE_VERSION=$SGE_VERSION
LXM3_TESTBED_SGE_ROOT=$SGE_ROOT
LXM3_TESTBED_SGE_CELL=$SGE_CELL
LXM3_TESTBED_SGE_HOST=$SGE_HOST
LXM3_TESTBED_SGE_QMASTER_PORT=$SGE_QMASTER_PORT
LXM3_TESTBED_SGE_EXECD_PORT=$SGE_EXECD_PORT
LXM3_TESTBED_SGE_QUEUE=$SGE_QUEUE
LXM3_TESTBED_SGE_PE=$SGE_PE
LXM3_TESTBED_SGE_SLOTS=$TB_SGE_SLOTS
LXM3_TESTBED_SGE_MAX_AJ_TASKS=$TB_SGE_MAX_AJ_TASKS
LXM3_TESTBED_PBS=$PBS_UP
EOF
if ((PBS_UP)); then
  cat >> "$WORK/env" <<EOF
LXM3_TESTBED_PBS_VERSION=$PBS_VERSION
LXM3_TESTBED_PBS_SSH_HOST=$TB_PBS_ADDR
LXM3_TESTBED_PBS_SSH_PORT=22
LXM3_TESTBED_PBS_SSHD_LOG=$PBS_SSHD_LOG
LXM3_TESTBED_PBS_EXEC=$PBS_EXEC
LXM3_TESTBED_PBS_CONF_FILE=$PBS_CONF
LXM3_TESTBED_PBS_HOME=$PBS_HOME_DIR
LXM3_TESTBED_PBS_SERVER=$PBS_SERVER
LXM3_TESTBED_PBS_NODE=$PBS_SERVER
LXM3_TESTBED_PBS_QUEUE=workq
LXM3_TESTBED_PBS_NCPUS=$TB_PBS_NCPUS
LXM3_TESTBED_PBS_MAX_ARRAY_SIZE=$TB_PBS_MAX_ARRAY_SIZE
LXM3_TESTBED_PBS_NETNS=$PBS_NETNS
EOF
else
  echo "# $PBS_NOTE" >> "$WORK/env"   # (a comment: the reason is not sh-safe)
fi
install -m 0644 "$WORK/env" "$TB_ENV_FILE"

log "READY in $(secs "$T_START") s (packages $(secs "$T_START" "$T_PKG") s [$PKG_NOTE], user+munge+slurm $(secs "$T_PKG" "$T_SLURM") s, sge $(secs "$T_SLURM" "$T_SGE") s, sshd $(secs "$T_SGE" "$T_SSH") s, wait-ready $(secs "$T_SSH" "$T_READY") s, ssh-check $(secs "$T_READY" "$T_CHECK") s, $PBS_TIMES, $SELFTEST_NOTE): ssh -p $TB_SSH_PORT $TB_USER@$TB_SSH_HOST; slurm $SLURM_VERSION cluster $SLURM_CLUSTER node $SLURM_NODE $state ports $TB_SLURMCTLD_PORT/$TB_SLURMD_PORT MaxArraySize=$TB_SLURM_MAX_ARRAY_SIZE MinJobAge=$TB_SLURM_MIN_JOB_AGE; sge $SGE_VERSION cell $SGE_CELL $qi $TB_SGE_SLOTS slots ports $SGE_QMASTER_PORT/$SGE_EXECD_PORT max_aj_tasks=$TB_SGE_MAX_AJ_TASKS; $PBS_NOTE; root $TB_ROOT; env $TB_ENV_FILE"
((PBS_FAILED == 0)) || exit 1
