#!/usr/bin/env bash
# selftest.sh - end-to-end check of a running test bed (about 15 s), done the
# way lxm3 works: as the client user, through ssh, as the test user.
#   rsync a file; Slurm: a 4-task array job, then scancel of a running and of
#   a pending job; Grid Engine: a 4-task array job.
# Run by `TESTBED_SELFTEST=1 up.sh`, or on its own (as root) after up.sh.
set -Eeuo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TB_NAME=testbed-selftest
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"
trap 'on_err $LINENO "$BASH_COMMAND"' ERR
require_root

T0=$(now)
KEY=$(home_of "$TB_CLIENT")/.ssh/id_ed25519
SSH_OPTS=(-o BatchMode=yes -o StrictHostKeyChecking=yes -o ConnectTimeout=10 -p "$TB_SSH_PORT" -i "$KEY")
# ssh joins its arguments with spaces and the remote shell parses them again:
# callers pass one already-quoted command string.
remote() { runuser -u "$TB_CLIENT" -- ssh "${SSH_OPTS[@]}" "$TB_USER@$TB_SSH_HOST" "$@"; }
DIR=.lxm3-testbed-selftest        # in the test user's home, replaced on each run
remote "rm -rf $DIR && mkdir -p $DIR/slurm $DIR/sge/logs"

log "rsync over ssh"
tmpf=$(mktemp)
echo "rsync-check $RANDOM" > "$tmpf"
chmod 0644 "$tmpf"
runuser -u "$TB_CLIENT" -- rsync -a -e "ssh ${SSH_OPTS[*]}" "$tmpf" "$TB_USER@$TB_SSH_HOST:$DIR/rsync.txt"
[[ $(remote "cat $DIR/rsync.txt") == "$(< "$tmpf")" ]] || die "rsync over ssh: content differs"
rm -f "$tmpf"

# --- Slurm -------------------------------------------------------------------
ACTIVE=PENDING,RUNNING,COMPLETING,CONFIGURING,SUSPENDED,REQUEUED,RESIZING,SIGNALING,STAGE_OUT
slurm_wait_gone() {  # jobid seconds: until no part of the job is active
  local k
  for ((k = 0; k < $2 * 4; k++)); do
    [[ -z $(remote "squeue -h -j $1 -t $ACTIVE -o %i" 2>/dev/null || echo error) ]] && return 0
    sleep 0.25
  done
  return 1
}
slurm_wait_state() {  # jobid state seconds
  local k
  for ((k = 0; k < $3 * 4; k++)); do
    [[ $(remote "squeue -h -j $1 -t all -o %T" 2>/dev/null || true) == "$2" ]] && return 0
    sleep 0.25
  done
  return 1
}
slurm_states() {  # jobid: final states as scontrol reports them, e.g. "COMPLETED x4"
  { remote "scontrol show job -o $1" 2>&1 || true; } | grep -oE 'JobState=[A-Z_]+' |
    sort | uniq -c | awk '{ printf "%s%s x%s", (NR > 1 ? ", " : ""), $2, $1 }' || true
}

log "slurm: sbatch --array=0-3"
jid=$(remote "cd $DIR/slurm && cat > array.sh && sbatch --parsable --array=0-3 --output=%A_%a.log array.sh" <<'EOF'
#!/bin/bash
echo "$SLURM_ARRAY_TASK_ID" > "task_$SLURM_ARRAY_TASK_ID.txt"
EOF
)
jid=${jid%%;*}   # --parsable prints "id" or "id;cluster"
[[ $jid =~ ^[0-9]+$ ]] || die "sbatch --parsable printed '$jid'"
slurm_wait_gone "$jid" 60 || die "array job $jid still active after 60 s"
for t in 0 1 2 3; do
  got=$(remote "cat $DIR/slurm/task_$t.txt" 2>/dev/null || true)
  [[ $got == "$t" ]] || die "slurm array task $t of job $jid wrote '${got:-nothing}'"
done
log "slurm: array job $jid done: $(slurm_states "$jid")"

log "slurm: scancel a running and a pending job"
jid=$(remote "sbatch --parsable --output=/dev/null --wrap 'sleep 300'")
jid=${jid%%;*}
slurm_wait_state "$jid" RUNNING 30 || die "job $jid did not start"
remote "scancel $jid"
slurm_wait_gone "$jid" 30 || die "job $jid still active after scancel"
[[ $(slurm_states "$jid") == *CANCELLED* ]] || die "job $jid: $(slurm_states "$jid") after scancel"
jid=$(remote "sbatch --parsable --output=/dev/null --begin=now+3600 --wrap true")
jid=${jid%%;*}
slurm_wait_state "$jid" PENDING 30 || die "job $jid not PENDING"
remote "scancel $jid"
slurm_wait_gone "$jid" 30 || die "pending job $jid still active after scancel"
[[ $(slurm_states "$jid") == *CANCELLED* ]] || die "job $jid: $(slurm_states "$jid") after scancel"
log "slurm: both cancelled"

# --- Grid Engine -------------------------------------------------------------
# -S /bin/bash: the queue ignores #! lines. The -o/-e directory must exist,
# or the job sits in Eqw. qsub -terse prints JOBID.FIRST-LAST:STEP for arrays.
log "sge: qsub -t 1-4"
out=$(remote "cd $DIR/sge && cat > array.sh && qsub -terse -t 1-4 -cwd -S /bin/bash -o logs/ -e logs/ array.sh" <<'EOF'
#!/bin/bash
echo "$SGE_TASK_ID" > "task_$SGE_TASK_ID.txt"
EOF
)
[[ $out =~ ^[0-9]+\.1-4:1$ ]] || die "qsub -terse -t 1-4 printed '$out'"
sjid=${out%%.*}
for ((k = 0; k < 240; k++)); do
  remote "qstat -j $sjid" >/dev/null 2>&1 || break   # exit 1 once the job is gone
  sleep 0.25
done
for t in 1 2 3 4; do
  got=$(remote "cat $DIR/sge/task_$t.txt" 2>/dev/null || true)
  [[ $got == "$t" ]] || die "sge array task $t of job $sjid wrote '${got:-nothing}': $(remote "qstat -j $sjid" 2>&1 || true)"
done
log "sge: array job $sjid done"

log "OK in $(secs "$T0") s"
