#!/usr/bin/env bash
# sandbox.sh - run a command as on a machine whose Slurm, munge, Grid Engine
# and sshd were never set up, without touching this machine's own: in private
# mount, network and pid namespaces (unshare), where the standard places
# (/etc/slurm, /etc/munge, /var/lib/munge, /run, /var/spool, /var/log, the
# packaged Grid Engine cell), /etc/netns (the PBS namespace's hosts and
# resolv.conf) and the test bed's directory are empty, and
# /etc/ssh, /etc/profile.d, /etc/default, root's ~/.ssh and the homes under
# /home (their dot files) are copies.
# Its network is its own (loopback and a link to nowhere), so nothing in it
# meets the machine's daemons, and every daemon started in it ends with the
# command, network namespaces made in it (the test bed's PBS) among them.
# The packages, and OpenPBS in /opt/pbs, must be installed already. For example, the guest check with a site that site.sh
# starts from nothing:
#
#   sudo bash tests/testbed/sandbox.sh bash tests/testbed/guest-check.sh
set -Eeuo pipefail
[[ $(id -u) == 0 ]] || { echo "$0 must run as root" >&2; exit 1; }
(($#)) || { echo "usage: $0 COMMAND [ARG...]" >&2; exit 2; }
ROOT=${TESTBED_ROOT:-/var/lib/lxm3-testbed}
COPY=$(mktemp -d /tmp/lxm3-sandbox.XXXXXX)
trap 'rm -rf "$COPY"' EXIT

# Copies of what the command may change but must stay as it is out here.
mkdir -p "$COPY/gridengine" "$COPY/home"
for d in /etc/ssh /etc/profile.d /etc/default /root/.ssh; do
  mkdir -p "$COPY$d"
  [[ -d $d ]] && cp -a "$d/." "$COPY$d/"
done
# The packaged SGE_ROOT without its cell: as the packages leave it.
for f in /var/lib/gridengine/*; do [[ ${f##*/} == default ]] || cp -a "$f" "$COPY/gridengine/"; done
chown --reference=/var/lib/gridengine "$COPY/gridengine"
# Each home directory under /home with its dot files only.
for h in /home/*/; do
  h=${h%/}
  mkdir -p "$COPY$h"
  chown --reference="$h" "$COPY$h"
  chmod --reference="$h" "$COPY$h"
  find "$h" -maxdepth 1 -name '.*' -type f -exec cp -a {} "$COPY$h/" \;
done

export COPY ROOT
# shellcheck disable=SC2016  # expanded by the bash in the namespaces
unshare --mount --net --pid --fork --mount-proc --propagation private bash -c '
  set -e
  ip link set lo up
  # An IPv4 address besides 127.0.0.1, on a link to nowhere: Slurm resolves
  # its listening address with AI_ADDRCONFIG, which ignores loopback ones.
  # (Not in 10.213.9.0/30, where the test bed puts its PBS namespace.)
  ip link add lxm3sb0 type veth peer name lxm3sb1
  ip addr add 10.213.8.1/30 dev lxm3sb0
  ip link set lxm3sb0 up
  ip link set lxm3sb1 up
  for d in /run /etc/slurm /etc/munge /var/lib/munge /var/spool /var/log /etc/netns "$ROOT"; do
    mkdir -p "$d"
    mount -t tmpfs -o mode=0755 sandbox "$d"
  done
  mkdir -p /run/lock /run/munge /run/sshd /var/log/slurm /var/log/munge
  chown munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
  chmod 0700 /etc/munge /var/lib/munge /var/log/munge
  # What the gridengine-master postinst leaves for a cluster nobody set up.
  install -d -o sgeadmin -g sgeadmin -m 0755 /var/spool/gridengine/qmaster \
    /var/spool/gridengine/qmaster/job_scripts /var/spool/gridengine/spooldb
  mount --bind "$COPY/gridengine" /var/lib/gridengine
  for d in /etc/ssh /etc/profile.d /etc/default /root/.ssh /home; do
    mount --bind "$COPY$d" "$d"
  done
  exec "$@"
' sandbox "$@"
