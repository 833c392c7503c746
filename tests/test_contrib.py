"""lxm3.contrib as lxm3 0.4.2 had it: UclGridEngine's rules for UCL's clusters
"cs" and "myriad", and configure_wandb's W&B variables per work unit."""

import glob
import os
import re

import pytest

import lxm3
from lxm3 import xm
from lxm3.contrib import ucl

from conftest import git, lxm3_cli, write_files

GB8 = 8 * xm.GB

# lxm3 0.4.2's rules, as its tests/ucl_test.py states them:
# (requirements, the -l resources, the -pe parallel environments).
CS_RULES = {
    "gpu": (dict(gpu=1, ram=GB8), {"gpu": "true", "tmem": GB8}, {}),
    "gpu_2": (dict(gpu=2, ram=GB8), {"gpu": "true", "tmem": GB8}, {"gpu": 2}),
    "cpu": (dict(ram=GB8), {"tmem": GB8, "h_vmem": GB8}, {}),
    "cpu_gpu_0": (dict(gpu=0, ram=GB8), {"tmem": GB8, "h_vmem": GB8}, {}),
    "cpu_2": (dict(gpu=0, cpu=2, ram=GB8), {"tmem": GB8, "h_vmem": GB8}, {"smp": 2}),
}
MYRIAD_RULES = {
    "gpu": (dict(gpu=1, ram=GB8), {"gpu": 1, "mem": GB8}, {}),
    "gpu_2": (dict(gpu=2, ram=GB8), {"gpu": 2, "mem": GB8}, {}),
    "cpu": (dict(ram=GB8), {"mem": GB8}, {}),
    "cpu_gpu_0": (dict(gpu=0, ram=GB8), {"mem": GB8}, {}),
    "cpu_2": (dict(gpu=0, cpu=2, ram=GB8), {"mem": GB8}, {"smp": 2}),
}

UCL_CONFIG = """\
    [[clusters]]
    name = "cs"
    server = "beaker.cs.ucl.ac.uk"
    [clusters.storage]
    staging = "/home/me/lxm3-staging"

    [[clusters]]
    name = "myriad"
    server = "myriad.rc.ucl.ac.uk"
    [clusters.storage]
    staging = "/scratch/scratch/me/lxm3-staging"
"""


@pytest.fixture
def ucl_config(tmp_path):
    """./lxm.toml with UCL's two clusters, cs first (so the default)."""
    write_files(tmp_path, {"lxm.toml": UCL_CONFIG})


def header_042(resources, parallel_environments, walltime="01:00:00"):
    """The resource lines 0.4.2's Grid Engine header had for these."""
    lines = {f"-l {key}={value}" for key, value in resources.items() if value}
    lines |= {f"-pe {name} {slots}" for name, slots in parallel_environments.items() if slots > 0}
    return lines | {f"-l h_rt={walltime}"}


def resource_lines(executor, cluster):
    directives = lxm3.SCHEDULERS["sge"].directives(executor, lxm3.ClusterConfig(cluster), "job")
    return {d for d in directives if d.startswith(("-l ", "-pe "))}


@pytest.mark.parametrize("case", sorted(CS_RULES))
def test_cs_rules(ucl_config, case):
    requirements, resources, parallel_environments = CS_RULES[case]
    executor = ucl.UclGridEngine(xm.JobRequirements(**requirements), walltime=3600)
    assert isinstance(executor, lxm3.GridEngine)
    assert executor.resources == resources
    assert executor.parallel_environments == parallel_environments
    assert executor.modules == []
    assert resource_lines(executor, "cs") == header_042(resources, parallel_environments)


@pytest.mark.parametrize("case", sorted(MYRIAD_RULES))
def test_myriad_rules(ucl_config, monkeypatch, case):
    monkeypatch.setenv("LXM_CLUSTER", "myriad")  # how 0.4.2's users picked the second cluster
    requirements, resources, parallel_environments = MYRIAD_RULES[case]
    executor = ucl.UclGridEngine(xm.JobRequirements(**requirements), walltime=3600)
    assert executor.resources == resources
    assert executor.parallel_environments == parallel_environments
    assert executor.modules == ["singularity-env"]
    assert resource_lines(executor, "myriad") == header_042(resources, parallel_environments)


def test_the_cluster_is_the_default_one_unless_named(ucl_config, monkeypatch):
    requirements = xm.JobRequirements(gpu=1, ram=GB8)
    assert ucl.UclGridEngine(requirements).resources == {"gpu": "true", "tmem": GB8}  # cs: first
    by_name = ucl.UclGridEngine(requirements, cluster="myriad")
    assert by_name.resources == {"gpu": 1, "mem": GB8} and by_name.cluster == "myriad"
    monkeypatch.setenv("LXM_CLUSTER", "myriad")
    assert ucl.UclGridEngine(requirements).resources == {"gpu": 1, "mem": GB8}


def test_other_arguments_are_grid_engines(ucl_config):
    executor = ucl.UclGridEngine(xm.JobRequirements(cpu=4, ram=GB8), walltime=7200, queue="short",
                                 max_parallel_tasks=3, resources={"tscratch": 10},
                                 modules=["python"])
    assert (executor.walltime, executor.queue, executor.max_parallel_tasks) == (7200, "short", 3)
    assert executor.resources == {"h_vmem": GB8, "tmem": GB8, "tscratch": 10}
    assert executor.parallel_environments == {"smp": 4}
    myriad = ucl.UclGridEngine(xm.JobRequirements(ram=GB8), cluster="myriad", modules=["python"])
    assert myriad.modules == ["singularity-env", "python"]


def test_what_ucl_cannot_translate_is_refused(tmp_path, ucl_config):
    with pytest.raises(ValueError, match=re.escape(
            "UclGridEngine does not take requirements.location: the cluster is cluster=..., else "
            "$LXM_CLUSTER, else the first in the config")):
        ucl.UclGridEngine(xm.JobRequirements(ram=GB8, location="node-1"))
    with pytest.raises(ValueError, match="V100=1 has no rule"):
        ucl.UclGridEngine(xm.JobRequirements(v100=1))
    (tmp_path / "lxm.toml").write_text('[[clusters]]\nname = "elsewhere"\n')
    with pytest.raises(lxm3.ConfigError, match="'cs' and 'myriad', not 'elsewhere'"):
        ucl.UclGridEngine(xm.JobRequirements(ram=GB8))


def test_a_ucl_launcher_dry_runs_with_the_clusters_directives(tmp_path, ucl_config):
    """0.4.2's style end to end: an absl launcher without a __main__ guard, UclGridEngine,
    ``lxm3 launch --dry-run``: the job script asks cs for what the rules say."""
    pytest.importorskip("absl")
    write_files(tmp_path, {
        "app/build.sh": "#!/bin/sh\ntrue\n",
        "launcher.py": """\
            from absl import app
            from lxm3 import xm, xm_cluster
            from lxm3.contrib import ucl

            def main(_):
                with xm_cluster.create_experiment("ucl") as experiment:
                    requirements = xm_cluster.JobRequirements(gpu=2, ram=8 * xm.GB)
                    executor = ucl.UclGridEngine(requirements, walltime=2 * xm.Hr)
                    spec = xm_cluster.UniversalPackage(
                        entrypoint=["echo hi"], build_script="build.sh", path="app")
                    [exe] = experiment.package([xm.Packageable(spec, executor_spec=executor.Spec())])
                    experiment.add(xm.Job(exe, executor))
        """,
    })
    os.chmod(tmp_path / "app" / "build.sh", 0o755)
    proc = lxm3_cli("launch", "--dry-run", "launcher.py", cwd=str(tmp_path),
                    env={"TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    [script] = glob.glob(str(tmp_path / "lxm3-dry-run-*" / "cs" / "experiments" / "*" / "wu1" / "job.sh"))
    with open(script) as f:
        header = {line[len("#$ "):].rstrip("\n") for line in f if line.startswith("#$ ")}
    assert header_042({"gpu": "true", "tmem": GB8}, {"gpu": 2}, "02:00:00") <= header


# --- configure_wandb -----------------------------------------------------------------

WANDB_LAUNCHER = """\
    from lxm3 import xm, xm_cluster
    from lxm3.contrib import wandb

    if __name__ == "__main__":
        with xm_cluster.create_experiment("wandb run") as experiment:
            executor = xm_cluster.Local()
            spec = xm_cluster.UniversalPackage(
                entrypoint=xm_cluster.CommandList([
                    'echo "WANDB $LXM_TASK_ID|$WANDB_NAME|$WANDB_RUN_GROUP|$WANDB_PROJECT|'
                    '$WANDB_ENTITY|$WANDB_MODE|${WANDB_GIT_REMOTE_URL-unset}|'
                    '${WANDB_GIT_COMMIT-unset}|$OWN|$*"', "true"]),
                build_script="build.sh", path="app")
            [exe] = experiment.package([xm.Packageable(spec, executor_spec=executor.Spec())])
            log_to_wandb = wandb.configure_wandb(project="proj", entity="me", group=WANDB_GROUP)
            experiment.add(log_to_wandb(xm.Job(exe, executor, env_vars={"OWN": "kept",
                                                                       "WANDB_MODE": "mine"})),
                           args={"args": {"seed": 7}})
            experiment.add(log_to_wandb(xm_cluster.ArrayJob(
                exe, executor, args=[{"task": 0}, {"task": 1}], env_vars=[{"OWN": "a"}, {"OWN": "b"}])))
"""


def launch_wandb(tmp_path, group="{title}_{xid}_{wid}"):
    write_files(tmp_path, {
        "app/build.sh": "#!/bin/sh\ntrue\n",
        "launcher.py": WANDB_LAUNCHER.replace("WANDB_GROUP)", repr(group) + ")"),
        # A launch must not import wandb (0.4.2's users have it, this one must not need it).
        "wandb.py": "raise SystemExit('wandb was imported')\n",
    })
    os.chmod(tmp_path / "app" / "build.sh", 0o755)
    proc = lxm3_cli("launch", "launcher.py", cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    [record] = [r.to_json() for r in lxm3.list_records() if r.title == "wandb run"]
    rows = {}
    for line in proc.stdout.splitlines():
        match = re.match(r"\[(\d+)(?::(\d+))?\] WANDB (.*)$", line)  # [wu] or [wu:task]
        if match:
            rows[int(match[1]), int(match[2] or 0)] = match[3].split("|")
    return record["experiment_id"], rows


def test_configure_wandb_names_each_work_unit_and_task(tmp_path):
    git(tmp_path, "init", "-q")
    git(tmp_path, "remote", "add", "origin", "https://example.org/me/research.git")
    (tmp_path / "README").write_text("x\n")
    git(tmp_path, "add", "README")
    git(tmp_path, "commit", "-q", "-m", "start")
    commit = git(tmp_path, "rev-parse", "HEAD")
    xid, rows = launch_wandb(tmp_path)
    remote = "https://example.org/me/research.git"
    # One xm.Job: its name is the work unit's; the W&B variables win over the job's own.
    assert rows[1, 0] == ["0", f"wandb run_{xid}_1", f"wandb run_{xid}_1", "proj", "me", "online",
                          remote, commit, "kept", "--seed=7"]
    # An ArrayJob: one run per task, numbered from 1 as 0.4.2 numbered them, one group.
    for task in (0, 1):
        assert rows[2, task] == [str(task), f"wandb run_{xid}_2_{task + 1}", f"wandb run_{xid}_2",
                                 "proj", "me", "online", remote, commit, "ab"[task],
                                 f"--task={task}"]
    assert len(rows) == 3


def test_configure_wandb_outside_git_and_with_its_own_group(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no repository above
    xid, rows = launch_wandb(tmp_path, group="sweep-{title}-{xid}")
    assert rows[1, 0][2] == f"sweep-wandb run-{xid}"
    assert rows[1, 0][6:8] == ["unset", "unset"]


def test_configure_wandb_takes_jobs_only():
    log_to_wandb = lxm3.configure_wandb("proj", "me")
    with pytest.raises(TypeError, match="xm.Job or an ArrayJob, not JobGroup"):
        log_to_wandb(xm.JobGroup())
