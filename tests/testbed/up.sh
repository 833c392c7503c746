#!/usr/bin/env bash
# up.sh - bring up the lxm3 integration test bed on this machine:
#   * Slurm (munged, slurmctld, slurmd): one node, one partition;
#   * Grid Engine (sge_qmaster, sge_execd): one host, queue all.q, PE smp;
#   * an OpenSSH server on 127.0.0.1 only, plus rsync;
#   * the unprivileged user lxm3test, reachable as `ssh lxm3test@localhost`
#     with the client user's key and strict host key checking.
# Then it checks that all of it answers, through ssh as lxm3test, and writes
# /etc/lxm3-testbed.env for the test suite (tests/testbed_env.py reads it).
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
trap 'on_err $LINENO "$BASH_COMMAND"' ERR
require_root

T_START=$(now)
NODE=$(hostname -s)
WORK=$(mktemp -d /tmp/lxm3-testbed-up.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

# =============================================================================
# 1. Packages: one apt run for everything, skipped when all are installed.
# =============================================================================
PACKAGES=("${SLURM_PACKAGES[@]}" "${SSH_PACKAGES[@]}" "${SGE_PACKAGES[@]}" "${LOGIN_NODE_PACKAGES[@]}")
missing=()
for p in "${PACKAGES[@]}"; do pkg_installed "$p" || missing+=("$p"); done
if ((${#missing[@]})); then
  log "installing ${missing[*]} (log: $APT_LOG)"
  # gridengine asks debconf questions: configure the cluster automatically,
  # cell "default", this host as the master. The postinst then runs
  # init_cluster (spool, global configuration, manager sgeadmin).
  debconf-set-selections <<EOF
gridengine-common shared/gridengineconfig boolean true
gridengine-common shared/gridenginecell string default
gridengine-common shared/gridenginemaster string $(hostname)
gridengine-client shared/gridengineconfig boolean true
gridengine-client shared/gridenginecell string default
gridengine-client shared/gridenginemaster string $(hostname)
EOF
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
# 2. Test user and the client's ssh key.
# =============================================================================
if ! id -u "$TB_USER" >/dev/null 2>&1; then
  log "creating user $TB_USER"
  # Tolerate another provisioning step creating the same user at this moment.
  useradd --create-home --shell /bin/bash "$TB_USER" 2>"$WORK/useradd.err" ||
    id -u "$TB_USER" >/dev/null 2>&1 || die "useradd $TB_USER: $(cat "$WORK/useradd.err")"
fi
# Grid Engine rejects jobs from uids below its min_uid (1000): "your user id
# 0 is lower than minimum user id 1000 of cluster configuration".
(($(id -u "$TB_USER") >= 1000)) || die "uid of $TB_USER is $(id -u "$TB_USER"); Grid Engine needs >= 1000"
TB_HOME=$(home_of "$TB_USER")
TB_GROUP=$(id -gn "$TB_USER")
[[ -d $TB_HOME ]] || install -d -o "$TB_USER" -g "$TB_GROUP" -m 0755 "$TB_HOME"

getent passwd "$TB_CLIENT" >/dev/null || die "TESTBED_CLIENT_USER '$TB_CLIENT' does not exist"
CLIENT_HOME=$(home_of "$TB_CLIENT")
install -d -o "$TB_CLIENT" -g "$(id -gn "$TB_CLIENT")" -m 0700 "$CLIENT_HOME/.ssh"
CLIENT_KEY=$CLIENT_HOME/.ssh/id_ed25519       # a default name: plain `ssh` finds it
CLIENT_KNOWN_HOSTS=$CLIENT_HOME/.ssh/known_hosts
if [[ ! -f $CLIENT_KEY ]]; then
  log "creating ssh key $CLIENT_KEY"
  runuser -u "$TB_CLIENT" -- ssh-keygen -q -t ed25519 -N '' -C "$TB_CLIENT@$NODE-lxm3-testbed" -f "$CLIENT_KEY"
elif [[ ! -f $CLIENT_KEY.pub ]]; then
  runuser -u "$TB_CLIENT" -- ssh-keygen -y -f "$CLIENT_KEY" > "$CLIENT_KEY.pub"
fi
install -d -o "$TB_USER" -g "$TB_GROUP" -m 0700 "$TB_HOME/.ssh"
AUTH_KEYS=$TB_HOME/.ssh/authorized_keys
touch "$AUTH_KEYS"
grep -qxF "$(< "$CLIENT_KEY.pub")" "$AUTH_KEYS" || cat "$CLIENT_KEY.pub" >> "$AUTH_KEYS"
chown "$TB_USER:$TB_GROUP" "$AUTH_KEYS"
chmod 0600 "$AUTH_KEYS"

# =============================================================================
# 3. munge and Slurm. The daemons are started here; waiting for the node to
#    be idle happens in step 6, so Grid Engine and ssh start meanwhile.
# =============================================================================
getent passwd munge >/dev/null || die "user munge does not exist (munge package broken?)"
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
  log "creating /etc/munge/munge.key"
  mungekey --create --keyfile=/etc/munge/munge.key --force
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if ! running_pid "$PID_MUNGED" munged >/dev/null; then
  rm -f "$PID_MUNGED"
  runuser -u munge -- /usr/sbin/munged
  pid=$(wait_pidfile "$PID_MUNGED" munged) || die "munged did not start"
  log "munged started (pid $pid)"
fi
munge -n | unmunge >/dev/null || die "munge round trip (munge -n | unmunge) failed"

getent passwd slurm >/dev/null || die "user slurm does not exist (slurm packages broken?)"
install -d -m 0755 /etc/slurm
install -d -o slurm -g slurm -m 0755 /var/spool/slurmctld /var/log/slurm
install -d -m 0755 /var/spool/slurmd

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
# Written by lxm3 tests/testbed/up.sh: one-node Slurm for tests. Edits are overwritten.
ClusterName=$SLURM_CLUSTER
# Name(address) and NodeAddr=127.0.0.1 keep name resolution out of the way.
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$PID_SLURMCTLD
SlurmdPidFile=$PID_SLURMD
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
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
JobCompLoc=/var/log/slurm/jobcomp.log
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
NodeName=$NODE NodeAddr=127.0.0.1 $node_hw RealMemory=$mem State=UNKNOWN
PartitionName=$SLURM_PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
then
  log "wrote $SLURM_CONF (MaxArraySize=$TB_SLURM_MAX_ARRAY_SIZE MinJobAge=$TB_SLURM_MIN_JOB_AGE, $node_hw RealMemory=$mem)"
  stop_daemon "$PID_SLURMD" slurmd          # a changed slurm.conf is applied by a restart
  stop_daemon "$PID_SLURMCTLD" slurmctld
fi
if ! running_pid "$PID_SLURMCTLD" slurmctld >/dev/null; then
  rm -f "$PID_SLURMCTLD"
  /usr/sbin/slurmctld
  pid=$(wait_pidfile "$PID_SLURMCTLD" slurmctld) || die "slurmctld did not start"
  log "slurmctld started (pid $pid)"
fi
for ((i = 0; i < TB_TIMEOUT * 4; i++)); do
  scontrol ping 2>/dev/null | grep -q 'is UP' && break
  sleep 0.25
done
scontrol ping 2>/dev/null | grep -q 'is UP' || die "slurmctld does not answer 'scontrol ping'"
if ! running_pid "$PID_SLURMD" slurmd >/dev/null; then
  rm -f "$PID_SLURMD"
  /usr/sbin/slurmd
  pid=$(wait_pidfile "$PID_SLURMD" slurmd) || die "slurmd did not start"
  log "slurmd started (pid $pid)"
fi
T_SLURM=$(now)

# =============================================================================
# 4. Grid Engine.
# =============================================================================
id sgeadmin >/dev/null 2>&1 || die "user sgeadmin does not exist (gridengine-common postinst failed?)"
# Normally made by the packages' postinst; repaired here in case they were
# installed earlier with other debconf answers.
install -d -o sgeadmin -g sgeadmin -m 0755 "$SGE_ROOT" "$SGE_ROOT/$SGE_CELL" "$SGE_COMMON" \
  "$SGE_SPOOL/qmaster" "$SGE_SPOOL/qmaster/job_scripts" "$SGE_SPOOL/spooldb" "$SGE_SPOOL/execd"
[[ -e $SGE_COMMON/bootstrap ]] ||
  install -m 0644 -o sgeadmin -g sgeadmin /usr/share/gridengine/default-bootstrap "$SGE_COMMON/bootstrap"
[[ -e /etc/default/gridengine ]] ||
  sed "s@^SGE_CELL=.*@SGE_CELL=$SGE_CELL@" /usr/share/gridengine/templates/gridengine.default > /etc/default/gridengine
if [[ ! -e $SGE_SPOOL/spooldb/sge ]]; then
  log "initialising the Grid Engine spool (init_cluster)"
  runuser -u sgeadmin -- /usr/share/gridengine/scripts/init_cluster "$SGE_ROOT" "$SGE_CELL" "$SGE_SPOOL/spooldb" sgeadmin
fi

# Host names. SGE's commlib maps each peer address back to a name. Where the
# host name resolves to 127.0.0.1 and /etc/hosts lists "localhost" first for
# that address, qmaster calls itself "localhost" and rejects every client:
#   commlib error: access denied (client IP resolved to host name "localhost".
#   This is not identical to clients host name "vm")
# The fix stays inside SGE: $SGE_COMMON/host_aliases maps those names to the
# host name, computed with SGE's own resolver utilities (the alias file is
# bypassed by pointing them at a cell that does not exist).
sge_resolve() { SGE_CELL=__no_alias_file__ "$SGE_LIB/$1" "${@:2}"; }
SGE_HOST=$(sge_resolve gethostname -name) && [[ -n $SGE_HOST ]] || die "SGE cannot resolve this host's name ($(hostname))"
addrs=$(sge_resolve gethostname -all | sed -n 's/^Host Address(es): *//p')
aliases=()
for ip in $addrs; do
  rev=$(sge_resolve gethostbyaddr -name "$ip" 2>/dev/null || true)
  if [[ -n $rev && $rev != "$SGE_HOST" && " ${aliases[*]} " != *" $rev "* ]]; then aliases+=("$rev"); fi
done
sge_names_changed=0
if ((${#aliases[@]})); then
  write_if_changed "$SGE_COMMON/host_aliases" 0644 sgeadmin <<<"$SGE_HOST ${aliases[*]}" && sge_names_changed=1
elif [[ -e $SGE_COMMON/host_aliases ]]; then
  rm -f "$SGE_COMMON/host_aliases"
  sge_names_changed=1
fi
write_if_changed "$SGE_COMMON/act_qmaster" 0644 sgeadmin <<<"$SGE_HOST" && sge_names_changed=1
# Daemons started before the alias file existed (e.g. by a package's init
# script where policy-rc.d allows it) know the wrong name: restart them.
if ((sge_names_changed)); then
  log "SGE host name $SGE_HOST (aliases: ${aliases[*]:-none})"
  if pid=$(sge_execd_pid); then log "restarting sge_execd (host names changed)"; stop_pid "$pid" sge_execd 30; fi
  if pid=$(sge_qmaster_pid); then log "restarting sge_qmaster (host names changed)"; stop_pid "$pid" sge_qmaster 30; fi
fi

# The /usr/bin/q* wrappers find the cell through /etc/default/gridengine, but
# scripts that build $SGE_ROOT/$SGE_CELL/... paths need the variables. Login
# shells read /etc/profile.d; `ssh host cmd` reads neither /etc/profile nor
# /etc/profile.d, but Debian's bash sources ~/.bashrc when started by sshd, so
# the test user's ~/.bashrc exports them before its "not interactive" return.
write_if_changed /etc/profile.d/gridengine.sh 0644 <<EOF || true
# Grid Engine environment (written by lxm3 tests/testbed/up.sh)
export SGE_ROOT=$SGE_ROOT
export SGE_CELL=$SGE_CELL
EOF
if ! grep -qxF "$BASHRC_BEGIN" "$TB_HOME/.bashrc" 2>/dev/null; then
  { printf '%s\n' "$BASHRC_BEGIN" "export SGE_ROOT=$SGE_ROOT SGE_CELL=$SGE_CELL" "$BASHRC_END"
    cat "$TB_HOME/.bashrc" 2>/dev/null || true; } > "$WORK/bashrc"
  install -m 0644 -o "$TB_USER" -g "$TB_GROUP" "$WORK/bashrc" "$TB_HOME/.bashrc"
fi

# Start a Grid Engine daemon ($1 = sge_qmaster|sge_execd). They daemonize and
# drop to sgeadmin themselves; setsid and closed stdio detach them from us.
sge_start() {
  (cd / && setsid "/usr/sbin/$1" </dev/null >/dev/null 2>&1) || die "$1 failed to start"
  local i pid
  for ((i = 0; i < TB_TIMEOUT * 5; i++)); do
    pid=$("${1}_pid") && { log "$1 started (pid $pid)"; return 0; }
    sleep 0.2
  done
  die "$1 did not stay up"
}
sge_qmaster_pid >/dev/null || sge_start sge_qmaster
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
#  - max_aj_tasks: the most tasks an array job may have.
mkdir -p "$WORK/conf"
qconf -sconf global | grep -v '^#' > "$WORK/global.orig"
cp "$WORK/global.orig" "$WORK/conf/global"
sge_set "$WORK/conf/global" reporting_params "accounting=true reporting=false flush_time=00:00:01 joblog=false sharelog=00:00:00 accounting_flush_time=00:00:00"
sge_set "$WORK/conf/global" min_uid 1000
sge_set "$WORK/conf/global" min_gid 1000
sge_set "$WORK/conf/global" max_aj_tasks "$TB_SGE_MAX_AJ_TASKS"
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
tmpdir                /tmp
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

sge_execd_pid >/dev/null || sge_start sge_execd
T_SGE=$(now)

# =============================================================================
# 5. sshd on 127.0.0.1 and known_hosts. Host key checking is never disabled:
#    the served keys are checked against /etc/ssh and recorded.
# =============================================================================
ssh-keygen -A >/dev/null      # creates only missing host keys
install -d -m 0755 /run/sshd  # privilege separation directory
sshd_changed=0
write_if_changed "$SSHD_CONF" 0644 <<EOF && sshd_changed=1
# Written by lxm3 tests/testbed/up.sh: loopback-only sshd for the test bed.
Port $TB_SSH_PORT
ListenAddress 127.0.0.1
HostKey /etc/ssh/ssh_host_ed25519_key
HostKey /etc/ssh/ssh_host_ecdsa_key
HostKey /etc/ssh/ssh_host_rsa_key
PidFile $PID_SSHD
PermitRootLogin prohibit-password
PubkeyAuthentication yes
AuthorizedKeysFile .ssh/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
# UsePAM must stay on: useradd leaves the password locked ("!"), and without
# PAM sshd refuses even key logins to a locked account.
UsePAM yes
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
foreign_sshd=
if running_pid "$PID_SSHD" sshd >/dev/null; then
  :
elif (exec 3<>"/dev/tcp/127.0.0.1/$TB_SSH_PORT") 2>/dev/null; then
  # Another server has the port (e.g. an sshd someone else started). It is
  # used as is if it serves this machine's host keys and accepts the key
  # (both checked below); otherwise set TESTBED_SSH_PORT.
  foreign_sshd=" (127.0.0.1:$TB_SSH_PORT is served by an sshd up.sh did not start; set TESTBED_SSH_PORT to use another port)"
  log "127.0.0.1:$TB_SSH_PORT already has a server up.sh did not start; trying to use it"
else
  rm -f "$PID_SSHD"
  /usr/sbin/sshd -f "$SSHD_CONF" -E "$SSHD_LOG"
  pid=$(wait_pidfile "$PID_SSHD" sshd) || die "sshd did not start"
  log "sshd started (pid $pid, 127.0.0.1:$TB_SSH_PORT)"
fi

# Port 22 entries read "localhost ssh-ed25519 ...", others "[localhost]:2222 ...".
if ((TB_SSH_PORT == 22)); then hostspecs=(localhost 127.0.0.1); else hostspecs=("[localhost]:$TB_SSH_PORT" "[127.0.0.1]:$TB_SSH_PORT"); fi
scan=
for ((i = 0; i < 20; i++)); do
  scan=$(ssh-keyscan -T 5 -p "$TB_SSH_PORT" localhost 127.0.0.1 2>/dev/null | sort -u || true)
  [[ -n $scan ]] && break
  sleep 0.25
done
[[ -n $scan ]] || die "ssh-keyscan got no host key from 127.0.0.1:$TB_SSH_PORT"
while read -r _ ktype kdata; do
  grep -qF "$ktype $kdata" /etc/ssh/ssh_host_*_key.pub ||
    die "the server on 127.0.0.1:$TB_SSH_PORT serves a $ktype host key that is not in /etc/ssh$foreign_sshd"
done <<<"$scan"
# Recorded for the client user and machine-wide (for any other local user).
add_known_hosts() {
  local kh=$1 owner=$2 h
  touch "$kh"
  for h in "${hostspecs[@]}"; do ssh-keygen -R "$h" -f "$kh" >/dev/null 2>&1 || true; done
  rm -f "$kh.old"
  printf '%s\n' "$scan" >> "$kh"
  chown "$owner:$(id -gn "$owner")" "$kh"
  chmod 0644 "$kh"
}
add_known_hosts "$CLIENT_KNOWN_HOSTS" "$TB_CLIENT"
add_known_hosts /etc/ssh/ssh_known_hosts root
T_SSH=$(now)

# =============================================================================
# 6. Wait until both schedulers can run jobs.
# =============================================================================
resumed=0
state=
for ((i = 0; i < TB_TIMEOUT * 4; i++)); do
  state=$(sinfo -h -N -n "$NODE" -o %t 2>/dev/null | head -n 1 || true)
  case $state in
    idle | mix | alloc) break ;;
    drain | drng | down)  # slurmd answers but the node is held: resume it once
      if ((!resumed && i > 20)); then
        log "node $NODE is $state ($(scontrol show node "$NODE" | grep -o 'Reason=.*' || true)); resuming"
        scontrol update NodeName="$NODE" State=RESUME || true
        resumed=1
      fi ;;
  esac
  sleep 0.25
done
[[ $state =~ ^(idle|mix|alloc)$ ]] ||
  die "Slurm node $NODE not ready after ${TB_TIMEOUT}s (sinfo state '${state:-none}'): $(scontrol show node "$NODE" 2>&1 || true)"

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
# It asks each daemon: sinfo slurmctld, `scontrol show slurmd` slurmd, qstat
# sge_qmaster, qping sge_execd (tests/testbed_env.py probes the same way).
SGE_EXECD_PORT=$(getent services sge_execd | awk '{ sub("/.*", "", $2); print $2 }')
SGE_EXECD_PORT=${SGE_EXECD_PORT:-6445}
# shellcheck disable=SC2016  # $(...) and $SGE_ROOT are expanded by the remote shell
check=$(runuser -u "$TB_CLIENT" -- ssh "${SSH_OPTS[@]}" "$TB_USER@$TB_SSH_HOST" \
  'echo "user=$(id -un) sge_root=$SGE_ROOT"; echo "sinfo=$(sinfo -h -N -o %t)"
   scontrol show slurmd >/dev/null && echo slurmd=ok; qstat -f >/dev/null && echo qstat=ok
   qping -info '"$SGE_HOST $SGE_EXECD_PORT"' execd 1 >/dev/null && echo execd=ok; true' 2>&1) ||
  die "ssh $TB_USER@$TB_SSH_HOST (BatchMode, strict host key checking) failed$foreign_sshd: $check"
for want in "user=$TB_USER sge_root=$SGE_ROOT" slurmd=ok qstat=ok execd=ok; do
  grep -qxF "$want" <<<"$check" || die "readiness check through ssh: expected '$want' in: $check"
done
grep -qE '^sinfo=(idle|mix|alloc)' <<<"$check" || die "readiness check through ssh: sinfo says: $check"
T_CHECK=$(now)

if [[ ${TESTBED_SELFTEST:-0} == 1 ]]; then
  bash "$HERE/selftest.sh" || die "selftest.sh failed"
  SELFTEST_NOTE="self-test $(secs "$T_CHECK") s"
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
LXM3_TESTBED_SSH_USER=$TB_USER
LXM3_TESTBED_SSH_HOST=$TB_SSH_HOST
LXM3_TESTBED_SSH_PORT=$TB_SSH_PORT
LXM3_TESTBED_SSH_KEY=$CLIENT_KEY
LXM3_TESTBED_SSH_KNOWN_HOSTS=$CLIENT_KNOWN_HOSTS
LXM3_TESTBED_CLIENT_USER=$TB_CLIENT
LXM3_TESTBED_USER_HOME=$TB_HOME
LXM3_TESTBED_SLURM=1
LXM3_TESTBED_SLURM_VERSION=$SLURM_VERSION
LXM3_TESTBED_SLURM_PARTITION=$SLURM_PARTITION
LXM3_TESTBED_SLURM_NODE=$NODE
LXM3_TESTBED_SLURM_CPUS=$cpus
LXM3_TESTBED_SLURM_MAX_ARRAY_SIZE=$TB_SLURM_MAX_ARRAY_SIZE
LXM3_TESTBED_SLURM_MIN_JOB_AGE=$TB_SLURM_MIN_JOB_AGE
LXM3_TESTBED_SGE=1
LXM3_TESTBED_SGE_VERSION=$SGE_VERSION
LXM3_TESTBED_SGE_ROOT=$SGE_ROOT
LXM3_TESTBED_SGE_CELL=$SGE_CELL
LXM3_TESTBED_SGE_HOST=$SGE_HOST
LXM3_TESTBED_SGE_EXECD_PORT=$SGE_EXECD_PORT
LXM3_TESTBED_SGE_QUEUE=$SGE_QUEUE
LXM3_TESTBED_SGE_PE=$SGE_PE
LXM3_TESTBED_SGE_SLOTS=$TB_SGE_SLOTS
LXM3_TESTBED_SGE_MAX_AJ_TASKS=$TB_SGE_MAX_AJ_TASKS
EOF
install -m 0644 "$WORK/env" "$TB_ENV_FILE"

log "READY in $(secs "$T_START") s (packages $(secs "$T_START" "$T_PKG") s [$PKG_NOTE], user+munge+slurm $(secs "$T_PKG" "$T_SLURM") s, sge $(secs "$T_SLURM" "$T_SGE") s, sshd $(secs "$T_SGE" "$T_SSH") s, wait-ready $(secs "$T_SSH" "$T_READY") s, ssh-check $(secs "$T_READY" "$T_CHECK") s, $SELFTEST_NOTE): ssh $TB_USER@$TB_SSH_HOST:$TB_SSH_PORT; slurm $SLURM_VERSION node $NODE $state MaxArraySize=$TB_SLURM_MAX_ARRAY_SIZE MinJobAge=$TB_SLURM_MIN_JOB_AGE; sge $SGE_VERSION $qi $TB_SGE_SLOTS slots max_aj_tasks=$TB_SGE_MAX_AJ_TASKS; env $TB_ENV_FILE"
