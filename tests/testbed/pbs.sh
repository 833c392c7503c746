# shellcheck shell=bash disable=SC2034  # PBS_UP, PBS_NOTE, PBS_TIMES are read by up.sh
# pbs.sh - the test bed's OpenPBS, sourced by up.sh (pbs_up) and down.sh
# (pbs_down). Sourced after lib.sh, never run.
#
# PBS refuses loopback addresses (get_host_ips() in Libnet skips 127/8), so
# its complex lives in a network namespace of the test bed's own, $PBS_NETNS:
# lo, one end of a veth pair ($TB_PBS_ADDR/30) and no default route; the other
# end ($TB_PBS_PEER) is here. Inside it run pbs_server, pbs_sched, pbs_comm,
# pbs_mom, PBS's own PostgreSQL and a second sshd of the test bed on
# $TB_PBS_ADDR:22, through which clients reach PBS the way a user reaches a
# cluster. The server's name ($PBS_SERVER) resolves only inside the
# namespace. Every file is under $PBS_DIR, but the namespace's own
# /etc/netns/$PBS_NETNS and the programs in $PBS_EXEC.
#
# The namespace is the test bed's: every process in it was started by pbs_up
# or through its sshd, so down.sh may stop all of them. Nothing is found or
# killed by name; a site's PBS (/etc/pbs.conf, /var/spool/pbs, its daemons)
# is never read, written or signalled.

inns() { ip netns exec "$PBS_NETNS" "$@"; }
# PBS's init script with the test bed's pbs.conf, inside the namespace. It
# asks `systemctl is-enabled pbs` (or chkconfig; with neither it assumes yes)
# whether PBS is registered for boot, and if so treats the start as a boot:
# it starts PBS in the background and records the boot time in
# /var/tmp/pbs_boot_check, a file of the machine's own PBS. The test bed's
# PBS is never started at boot: a stub systemctl first on the script's PATH
# says so.
pbs_init() {
  local stub=$PBS_DIR/initbin
  if [[ ! -x $stub/systemctl ]]; then
    install -d -m 0755 "$stub"
    printf '#!/bin/sh
# lxm3 test bed: its PBS is not started at boot (see pbs.sh)
exit 1
' > "$stub/systemctl"
    chmod 0755 "$stub/systemctl"
  fi
  inns env PBS_CONF_FILE="$PBS_CONF" PATH="$stub:/usr/sbin:/usr/bin:/sbin:/bin" \
    "$PBS_EXEC/libexec/pbs_init.d" "$@"
}
# PBS commands as root inside the namespace, on the test bed's complex.
pbs_cmd() { local c=$1; shift; inns env PBS_CONF_FILE="$PBS_CONF" "$PBS_EXEC/bin/$c" "$@"; }
pbs_netns_exists() { [[ -e /run/netns/$PBS_NETNS ]]; }
pbs_netns_pids() { pbs_netns_exists && ip netns pids "$PBS_NETNS" 2>/dev/null; }

# The pid in PBS lock file $1 (relative to PBS_HOME) if it is a live $2 inside
# the namespace.
pbs_daemon_pid() {
  local pid
  [[ -s $PBS_HOME_DIR/$1 ]] || return 1
  pid=$(head -n 1 "$PBS_HOME_DIR/$1" 2>/dev/null | tr -dc 0-9)
  [[ -n $pid ]] && pid_alive "$pid" "$2" && grep -qx "$pid" <<<"$(pbs_netns_pids)" && echo "$pid"
}
pbs_pids() {
  local e
  for e in "${PBS_PIDFILES[@]}"; do pbs_daemon_pid "${e%%:*}" "${e##*:}" || true; done
  running_pid "$PID_PBS_SSHD" sshd || true
}

# Why PBS cannot run here, or nothing: network namespaces need CAP_NET_ADMIN
# and CAP_SYS_ADMIN (an unprivileged container has neither).
pbs_unsupported() {
  local probe=lxm3tb-probe-$$ out
  pbs_netns_exists && return 0
  if ! out=$(ip netns add "$probe" 2>&1); then
    echo "'ip netns add' is not permitted here ($out)"
    return 0
  fi
  ip netns delete "$probe" 2>/dev/null || true
}

# The source tarball: TESTBED_PBS_SOURCE, or the one in shared/testbed/pbs/
# beside the repository.
pbs_source_tarball() {
  local f
  if [[ -n $PBS_SOURCE ]]; then echo "$PBS_SOURCE"; return; fi
  for f in "$(cd "$HERE/../.." && pwd)"/../shared/testbed/pbs/openpbs-*.tar.xz; do echo "$f"; return; done
}

# --- the programs, like a package: built once into $PBS_EXEC -------------------
pbs_install() {
  local missing=() p src build
  for p in "${PBS_PACKAGES[@]}"; do pkg_installed "$p" || missing+=("$p"); done
  if ((${#missing[@]})); then
    log "installing PBS's build and run dependencies: ${missing[*]} (log: $APT_LOG)"
    apt_get update
    apt_get install -y --no-install-recommends "${PBS_PACKAGES[@]}"
  fi
  [[ -x $PBS_EXEC/bin/qsub && -x $PBS_EXEC/sbin/pbs_server.bin && -x $PBS_EXEC/libexec/pbs_init.d ]] && return 0
  src=$(pbs_source_tarball)
  [[ -n $src && -f $src ]] ||
    die "FATAL: $PBS_EXEC/bin/qsub is missing and the OpenPBS source tarball to build it from is not there: $src (set TESTBED_PBS_SOURCE to the openpbs-*.tar.xz)"
  build=$PBS_DIR/build
  log "building OpenPBS from $src into $PBS_EXEC (about 2 min on 2 cores; log $PBS_LOG)"
  rm -rf "$build"
  install -d "$build"
  tar -xJf "$src" -C "$build"
  src=$(find "$build" -mindepth 2 -maxdepth 2 -name configure.ac -printf '%h\n' | head -n 1)
  [[ -n $src ]] || die "no configure.ac in the tarball"
  # A clean PATH: root's pyenv shims would get a pyenv Python embedded.
  (cd "$src" && env PATH=/usr/sbin:/usr/bin:/sbin:/bin bash -c "
      set -e
      ./autogen.sh
      ./configure --prefix='$PBS_EXEC' --with-python=/usr
      make -j$(nproc)
      make install") >> "$PBS_LOG" 2>&1 || die "building OpenPBS failed (log $PBS_LOG)"
  rm -rf "$build"
  # pbs_iff authenticates the clients of unprivileged users, pbs_rcp copies
  # files: both must be setuid root (the install guide's step).
  chmod 4755 "$PBS_EXEC/sbin/pbs_iff" "$PBS_EXEC/sbin/pbs_rcp"
  # No pbs_postinstall here: with the default configuration file it would
  # write /etc/pbs.conf, /etc/init.d/pbs and register PBS for boot. Each PBS
  # home gets it below instead, in its "sameconf" mode.
}

# --- the namespace -------------------------------------------------------------
pbs_netns_up() {
  local routed
  if pbs_netns_exists && inns ip -4 -o addr show dev "$PBS_VETH_NS" 2>/dev/null | grep -q " $TB_PBS_ADDR/30 " &&
     ip -4 -o addr show dev "$PBS_VETH_HERE" 2>/dev/null | grep -q " $TB_PBS_PEER/30 "; then
    :
  else
    routed=$(ip -4 route show to match "$TB_PBS_ADDR" | grep -v '^default' | grep -v "dev $PBS_VETH_HERE" || true)
    [[ -z $routed ]] ||
      refuse "$TB_PBS_ADDR, the address of the test bed's PBS namespace, is routed here already ($routed): set TESTBED_PBS_ADDR to an address in a free /30"
    log "creating network namespace $PBS_NETNS ($TB_PBS_PEER <-veth-> $TB_PBS_ADDR/30, no default route)"
    ip link del "$PBS_VETH_HERE" 2>/dev/null || true
    pbs_netns_exists || ip netns add "$PBS_NETNS"
    ip link add "$PBS_VETH_HERE" type veth peer name "$PBS_VETH_NS"
    ip link set "$PBS_VETH_NS" netns "$PBS_NETNS"
    sysctl -qw "net.ipv6.conf.$PBS_VETH_HERE.disable_ipv6=1" 2>/dev/null || true
    inns sysctl -qw "net.ipv6.conf.$PBS_VETH_NS.disable_ipv6=1" 2>/dev/null || true
    ip addr add "$TB_PBS_PEER/30" dev "$PBS_VETH_HERE"
    ip link set "$PBS_VETH_HERE" up
    inns ip link set lo up
    inns ip addr add "$TB_PBS_ADDR/30" dev "$PBS_VETH_NS"
    inns ip link set "$PBS_VETH_NS" up
  fi
  ! inns ip route | grep -q '^default' || die "namespace $PBS_NETNS has a default route"
  # Name resolution inside the namespace: the machine's hosts plus the
  # server's name, DNS only on loopback (nothing answers: no traffic out).
  install -d -m 0755 "$PBS_NETNS_ETC"
  { grep -v "[[:space:]]$PBS_SERVER\([[:space:]]\|$\)" /etc/hosts || true
    echo "$TB_PBS_ADDR $PBS_SERVER"; } | write_if_changed "$PBS_NETNS_ETC/hosts" 0644 || true
  printf 'nameserver 127.0.0.1\noptions timeout:1 attempts:1\n' |
    write_if_changed "$PBS_NETNS_ETC/resolv.conf" 0644 || true
  [[ $(inns getent ahostsv4 "$PBS_SERVER" | awk '{print $1; exit}') == "$TB_PBS_ADDR" ]] ||
    die "$PBS_SERVER does not resolve to $TB_PBS_ADDR inside $PBS_NETNS"
}

# --- PBS itself ----------------------------------------------------------------
# mom_priv/config: output delivered by cp (no scp or rcp between "hosts" that
# share one file system), the server as the only client host, and jobs'
# TMPDIR under the test bed's directory, not /var/tmp/pbs.<job id>, where a
# site's PBS puts its jobs'.
pbs_mom_config() {
  printf '%s\n' "\$clienthost $PBS_SERVER" "\$usecp *:/ /" "\$tmpdir $PBS_DIR/tmp" \
    "\$logevent 0x1ff" "\$restrict_user_maxsysid 999" |
    write_if_changed "$PBS_HOME_DIR/mom_priv/config" 0644
}

# PBS's PostgreSQL puts its socket and lock in /run/postgresql, which the
# namespace shares with the machine (the package's tmpfiles make the
# directory at boot; without systemd, nobody may have).
pbs_require_free_socket() {
  local lock=/run/postgresql/.s.PGSQL.$TB_PBS_DATA_SERVICE_PORT.lock pid
  [[ -d /run/postgresql ]] || install -d -o postgres -g postgres -m 2775 /run/postgresql
  [[ -f $lock ]] || return 0
  pid=$(head -n 1 "$lock" | tr -dc 0-9)
  if [[ -n $pid ]] && pid_alive "$pid" postgres; then
    grep -qx "$pid" <<<"$(pbs_netns_pids)" && return 0
    refuse "$lock is held by a PostgreSQL the test bed did not start (pid $pid): its PBS datastore would use the same socket; set TESTBED_PBS_DATA_SERVICE_PORT to another port"
  fi
}

# The test bed's pbs.conf (PBS_CONF_FILE).
pbs_conf_text() {
  cat <<EOF
PBS_EXEC=$PBS_EXEC
PBS_SERVER=$PBS_SERVER
PBS_LEAF_NAME=$PBS_SERVER
PBS_MOM_NODE_NAME=$PBS_SERVER
PBS_START_SERVER=1
PBS_START_SCHED=1
PBS_START_COMM=1
PBS_START_MOM=1
PBS_HOME=$PBS_HOME_DIR
PBS_DATA_SERVICE_PORT=$TB_PBS_DATA_SERVICE_PORT
PBS_TMPDIR=$PBS_DIR/tmp
PBS_CORE_LIMIT=unlimited
PBS_SCP=/usr/bin/scp
EOF
}

pbs_start() {
  local pid e all=1 mom_changed=0 conf_changed=0
  install -d -m 0755 "$PBS_DIR"
  [[ -d $PBS_DIR/tmp ]] || install -d -m 1777 "$PBS_DIR/tmp"
  # PBS_TMPDIR: qsub's background daemon listens on a socket in it, named
  # after the server, user and PBS_CONF_FILE; in /var/tmp (the default) a
  # qsub of another test bed with the same root (sandbox.sh) would find it.
  pbs_conf_text | write_if_changed "$PBS_CONF" 0644 && conf_changed=1
  if [[ ! -f $PBS_HOME_DIR/pbs_environment ]]; then
    # What a package's post-install does for a PBS home, reading our
    # pbs.conf ("sameconf": it writes no configuration file and no init script).
    PBS_CONF_FILE=$PBS_CONF "$PBS_EXEC/libexec/pbs_postinstall" server "" "$PBS_EXEC" "$PBS_HOME_DIR" "" sameconf \
      >> "$PBS_LOG" 2>&1 || die "pbs_postinstall for $PBS_HOME_DIR failed (log $PBS_LOG)"
  fi
  [[ -d $PBS_HOME_DIR/mom_priv ]] && pbs_mom_config && mom_changed=1
  for e in "${PBS_PIDFILES[@]}"; do pbs_daemon_pid "${e%%:*}" "${e##*:}" >/dev/null || all=0; done
  if ((conf_changed)) && [[ -n $(pbs_pids) ]]; then
    # A changed pbs.conf is applied by a restart (its running jobs end).
    log "$PBS_CONF changed: restarting PBS"
    pbs_init stop >> "$PBS_LOG" 2>&1 || true
    all=0
  fi
  if ((!all)); then
    pbs_require_free_socket
    log "starting PBS in namespace $PBS_NETNS (server $PBS_SERVER; log $PBS_LOG)"
    # The init script starts whatever of the five is not running (its
    # first start also initialises the datastore, pbs_habitat).
    pbs_init start >> "$PBS_LOG" 2>&1 ||
      die "PBS did not start (pbs_init.d start; log $PBS_LOG, $PBS_HOME_DIR/*_logs/)"
    mom_changed=0
  fi
  for ((i = 0; i < TB_TIMEOUT * 4; i++)); do
    pbs_cmd qstat -B >/dev/null 2>&1 && break
    sleep 0.25
  done
  pbs_cmd qstat -B >/dev/null 2>&1 || die "pbs_server does not answer qstat -B"
  pbs_mom_config && mom_changed=1   # (first start: pbs_habitat wrote its own)
  if ((mom_changed)) && pid=$(pbs_daemon_pid mom_priv/mom.lock pbs_mom); then
    log "mom_priv/config changed: pbs_mom (pid $pid) rereads it (SIGHUP)"
    kill -HUP "$pid"
  fi
  pbs_cmd pbsnodes "$PBS_SERVER" >/dev/null 2>&1 || pbs_cmd qmgr -c "create node $PBS_SERVER" >/dev/null
  # History for a day (qstat -x); all users see all jobs; the same user name
  # is the same user on every host; a small array limit (tests of lxm3's
  # array splitting); the scheduler every 2 s and at each submission.
  pbs_cmd qmgr -c "set server job_history_enable = True, job_history_duration = 24:00:00, flatuid = True, query_other_jobs = True, scheduler_iteration = 2, max_array_size = $TB_PBS_MAX_ARRAY_SIZE" >/dev/null
  pbs_cmd qmgr -c "set node $PBS_SERVER resources_available.ncpus = $TB_PBS_NCPUS" >/dev/null
}

# --- its sshd, inside the namespace ----------------------------------------------
pbs_sshd() {
  local changed=0 ktype kdata
  if [[ ! -s $PBS_SSH_HOST_KEY ]]; then
    rm -f "$PBS_SSH_HOST_KEY" "$PBS_SSH_HOST_KEY.pub"
    ssh-keygen -q -t ed25519 -N '' -C "lxm3 test bed PBS sshd ($TB_ROOT)" -f "$PBS_SSH_HOST_KEY"
  fi
  write_if_changed "$PBS_SSHD_CONF" 0644 <<EOF && changed=1
# Written by lxm3 tests/testbed/up.sh: the sshd of the test bed's PBS, inside
# network namespace $PBS_NETNS only.
Port 22
ListenAddress $TB_PBS_ADDR
HostKey $PBS_SSH_HOST_KEY
PidFile $PID_PBS_SSHD
AllowUsers $TB_USER
AuthorizedKeysFile $SSH_AUTH_DIR/%u
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM yes
UseDNS no
# The PBS commands of every session use the test bed's pbs.conf. Its bin/ is
# not put on PATH: /usr/bin/qsub may be Grid Engine's, and lxm3 finds PBS by
# its per-cluster setting ($PBS_EXEC).
SetEnv PBS_CONF_FILE=$PBS_CONF
X11Forwarding no
PrintMotd no
AcceptEnv LANG LC_*
MaxStartups 200:30:400
Subsystem sftp /usr/lib/openssh/sftp-server
EOF
  /usr/sbin/sshd -t -f "$PBS_SSHD_CONF" || die "sshd rejects $PBS_SSHD_CONF"
  ((changed)) && stop_daemon "$PID_PBS_SSHD" sshd
  if ! running_pid "$PID_PBS_SSHD" sshd >/dev/null; then
    rm -f "$PID_PBS_SSHD"
    [[ -d /run/sshd ]] || install -d -m 0755 /run/sshd
    inns /usr/sbin/sshd -f "$PBS_SSHD_CONF" -E "$PBS_SSHD_LOG"
    pid=$(wait_pidfile "$PID_PBS_SSHD" sshd) || die "the PBS sshd did not start"
    log "PBS sshd started in $PBS_NETNS (pid $pid, $TB_PBS_ADDR:22)"
  fi
  read -r ktype kdata _ < "$PBS_SSH_HOST_KEY.pub"
  printf '%s %s %s\n' "$TB_PBS_ADDR" "$ktype" "$kdata" |
    replace_block "$CLIENT_KNOWN_HOSTS" "$KNOWN_HOSTS_PBS_BEGIN" "$KNOWN_HOSTS_PBS_END" "$TB_CLIENT" 0644 bottom || true
}

# Each daemon in the namespace, nothing of PBS's listening out here.
pbs_check_netns() {
  local e pid nspids
  nspids=$(pbs_netns_pids)
  for e in "${PBS_PIDFILES[@]}"; do
    pid=$(pbs_daemon_pid "${e%%:*}" "${e##*:}") || die "${e##*:} (${e%%:*}) is not running inside $PBS_NETNS"
  done
  grep -qx "$(running_pid "$PID_PBS_SSHD" sshd)" <<<"$nspids" || die "the PBS sshd is not inside $PBS_NETNS"
  [[ -z $(ss -Hltn "( sport = :15001 or sport = :15004 or sport = :17001 or src $TB_PBS_ADDR )" 2>/dev/null) ]] ||
    die "PBS or its sshd listens outside $PBS_NETNS: $(ss -Hltnp "( sport = :15001 or sport = :15004 or sport = :17001 or src $TB_PBS_ADDR )")"
}

# Wait for the node, then one small array through the PBS sshd, as the tests
# submit: output files per subjob, history (qstat -x) once it is done.
pbs_ready() {
  local st='' i out
  for ((i = 0; i < TB_TIMEOUT * 4; i++)); do
    st=$(pbs_cmd pbsnodes "$PBS_SERVER" 2>/dev/null | awk '$1 == "state" {print $3}')
    [[ $st == free || $st == job-busy ]] && break
    sleep 0.25
  done
  [[ $st == free || $st == job-busy ]] || die "PBS node $PBS_SERVER is '${st:-unknown}', not free (see $PBS_HOME_DIR/mom_logs)"
  PBS_NODE_STATE=$st
  out=$(runuser -u "$TB_CLIENT" -- ssh -o BatchMode=yes -o StrictHostKeyChecking=yes -o ConnectTimeout=10 \
    -i "$CLIENT_KEY" "$TB_USER@$TB_PBS_ADDR" bash -s -- "$PBS_EXEC" 2>&1 <<'EOF'
set -eu
P=$1/bin
echo "conf=$PBS_CONF_FILE"
echo "qsub=$(command -v qsub || true)"
d=$(mktemp -d ~/.lxm3-testbed-pbs.XXXXXX)
trap 'rm -rf "$d"' EXIT
id=$(echo 'echo "task $PBS_ARRAY_INDEX"' | "$P/qsub" -N tbready -J 0-1 -j oe -o "$d/out.^array_index^")
echo "job=$id"
for i in $(seq 1 240); do
  [ "$("$P/qstat" -x -f "$id" 2>/dev/null | awk '$1 == "job_state" {print $3}')" = F ] && break
  sleep 0.25
done
for i in $(seq 1 40); do [ -s "$d/out.1" ] && [ -s "$d/out.0" ] && break; sleep 0.25; done
echo "out=$(cat "$d/out.0" "$d/out.1" 2>&1 | paste -sd, -)"
EOF
  ) || die "PBS readiness check through ssh $TB_USER@$TB_PBS_ADDR failed: $out"
  grep -qxF "conf=$PBS_CONF" <<<"$out" || die "PBS ssh sessions do not get PBS_CONF_FILE=$PBS_CONF: $out"
  grep -qxF "out=task 0,task 1" <<<"$out" || die "PBS smoke array (qsub -J 0-1) did not run: $out (logs in $PBS_HOME_DIR)"
  grep -q "^job=[0-9]*\[\]\.$PBS_SERVER$" <<<"$out" || die "PBS smoke array: unexpected job id: $out"
  [[ $(grep '^qsub=' <<<"$out") != "qsub=$PBS_EXEC/bin/qsub" ]] || die "$PBS_EXEC/bin is on the PATH of ssh sessions"
}

# pbs_up: everything; sets PBS_UP=1, or leaves it 0 with PBS_NOTE saying why
# (network namespaces not permitted here); PBS_NOTE and PBS_TIMES are for the
# summary line.
pbs_up() {
  local why
  if [[ $TB_PBS != 1 ]]; then PBS_NOTE="pbs left out (TESTBED_PBS=$TB_PBS)"; return 0; fi
  why=$(pbs_unsupported)
  if [[ -n $why ]]; then
    log "PBS left out: $why; the PBS tests skip (or fail under LXM3_REQUIRE_TESTBED=1)"
    PBS_NOTE="pbs left out: $why"
    return 0
  fi
  local t0 t1 t2 t3
  t0=$(now)
  install -d -m 0755 "$PBS_DIR"
  pbs_install
  t1=$(now)
  pbs_netns_up
  pbs_start
  pbs_sshd
  pbs_check_netns
  t2=$(now)
  pbs_ready
  t3=$(now)
  PBS_VERSION=$("$PBS_EXEC/bin/qstat" --version 2>/dev/null | awk -F'= *' '{print $2}')
  PBS_TIMES="pbs $(secs "$t0" "$t3") s [install $(secs "$t0" "$t1") s, netns+start+sshd $(secs "$t1" "$t2") s, smoke array $(secs "$t2" "$t3") s]"
  PBS_UP=1
  PBS_NOTE="pbs $PBS_VERSION server $PBS_SERVER node $PBS_NODE_STATE ncpus=$TB_PBS_NCPUS max_array_size=$TB_PBS_MAX_ARRAY_SIZE: ssh $TB_USER@$TB_PBS_ADDR (netns $PBS_NETNS, PBS_CONF_FILE=$PBS_CONF, $PBS_EXEC/bin)"
}

# pbs_down [purge]: stop it all, remove the namespace; purge: also its files.
pbs_down() {
  local purge=${1:-0} e pid
  stop_daemon "$PID_PBS_SSHD" sshd
  if pbs_netns_exists && [[ -x $PBS_EXEC/libexec/pbs_init.d && -f $PBS_CONF ]] && [[ -n $(pbs_pids) ]]; then
    log "stopping PBS in $PBS_NETNS (pbs_init.d stop)"
    pbs_init stop >> "$PBS_LOG" 2>&1 || true
  fi
  for e in "${PBS_PIDFILES[@]}"; do
    if pid=$(pbs_daemon_pid "${e%%:*}" "${e##*:}"); then
      log "stopping ${e##*:} (pid $pid)"
      stop_pid "$pid" "${e##*:}" 20
    fi
  done
  # Whatever else runs in the namespace was started through it: ssh
  # sessions, qsub's background daemons, jobs.
  if pbs_netns_exists; then
    for pid in $(pbs_netns_pids); do
      [[ -r /proc/$pid/comm ]] || continue
      log "stopping $(< "/proc/$pid/comm") (pid $pid), left in $PBS_NETNS"
      stop_pid "$pid" "$(< "/proc/$pid/comm")" 5
    done
    ip netns delete "$PBS_NETNS"
    log "removed network namespace $PBS_NETNS"
  fi
  ip link del "$PBS_VETH_HERE" 2>/dev/null || true
  rm -rf "$PBS_NETNS_ETC"
  if ((purge)); then
    rm -rf "$PBS_DIR"
    local client_home
    client_home=$(home_of "$TB_CLIENT" || true)
    if [[ -n $client_home ]]; then
      replace_block "$client_home/.ssh/known_hosts" "$KNOWN_HOSTS_PBS_BEGIN" "$KNOWN_HOSTS_PBS_END" \
        "$TB_CLIENT" 0644 bottom </dev/null || true
    fi
  fi
}
