"""No newline or control character reaches a scheduler directive, from any field.

A directive is one line of job.sh: a newline in a value would end it and make
the rest of the value a command of the job script (run as the user on the
node). Every field that becomes a directive or a scheduler argument is checked
where the executor is written, and every directive again as the header is made.
"""

import os
import re
import subprocess
import textwrap

import pytest

import lxm3
from lxm3 import xm

from conftest import lxm3_cli

BAD = {"newline": "\n", "carriage return": "\r", "escape": "\x1b", "NUL": "\x00",
       "vertical tab": "\x0b", "C1 next line": "\x85"}
MESSAGE = {"\n": "a newline", "\r": "a carriage return"}


def refused(executor, options, field):
    """Every bad character in ``options`` (made by a function of it) is refused at
    construction, with a message naming the executor field."""
    for char in BAD.values():
        described = MESSAGE.get(char, f"the control character {char!r}")
        with pytest.raises(ValueError, match=rf"^{re.escape(field)}: .* contains "
                           rf"{re.escape(described)}; scheduler directives"):
            executor(**options(f"value{char}#SBATCH --uid=0"))


SLURM_FIELDS = [
    ("Slurm(extra_directives=...)", lambda v: {"extra_directives": ["--mail-type=END", v]}),
    ("Slurm(skip_directives=...)", lambda v: {"skip_directives": [v]}),
    ("Slurm(resources=...) key", lambda v: {"resources": {v: "x"}}),
    ("Slurm(resources={'constraint': ...})", lambda v: {"resources": {"constraint": v}}),
    ("Slurm(partition=...)", lambda v: {"partition": v}),
    ("Slurm(account=...)", lambda v: {"account": v}),
    ("Slurm(qos=...)", lambda v: {"qos": v}),
    ("Slurm(log_directory=...)", lambda v: {"log_directory": v}),
    ("Slurm(modules=...)", lambda v: {"modules": ["gcc", v]}),
    ("Slurm(requirements=xm.JobRequirements(location=...))",
     lambda v: {"requirements": xm.JobRequirements(location=v)}),
]

SGE_FIELDS = [
    ("GridEngine(extra_directives=...)", lambda v: {"extra_directives": [v]}),
    ("GridEngine(skip_directives=...)", lambda v: {"skip_directives": [v]}),
    ("GridEngine(resources=...) key", lambda v: {"resources": {v: "1"}}),
    ("GridEngine(resources={'h_vmem': ...})", lambda v: {"resources": {"h_vmem": v}}),
    ("GridEngine(parallel_environments=...) name", lambda v: {"parallel_environments": {v: 4}}),
    ("GridEngine(queue=...)", lambda v: {"queue": v}),
    ("GridEngine(project=...)", lambda v: {"project": v}),
    ("GridEngine(account=...)", lambda v: {"account": v}),
    ("GridEngine(shell=...)", lambda v: {"shell": v}),
    ("GridEngine(log_directory=...)", lambda v: {"log_directory": v}),
    ("GridEngine(modules=...)", lambda v: {"modules": [v]}),
    ("GridEngine(requirements=xm.JobRequirements(location=...))",
     lambda v: {"requirements": xm.JobRequirements(location=v)}),
]


FIELDS = ([(lxm3.Slurm, field, options) for field, options in SLURM_FIELDS]
          + [(lxm3.GridEngine, field, options) for field, options in SGE_FIELDS])


@pytest.mark.parametrize("executor, field, options", FIELDS, ids=[f for _, f, _ in FIELDS])
def test_fields_with_control_characters_are_refused(executor, field, options):
    refused(executor, options, field)


def test_a_field_changed_after_construction_is_caught_as_the_header_is_made():
    cluster = lxm3.ClusterConfig(name="c", raw={})
    executor = lxm3.Slurm()
    executor.extra_directives.append("--comment=x\nrm -rf ~")
    with pytest.raises(ValueError, match=r"directive: '--comment=x\\nrm -rf ~' contains a newline"):
        lxm3.scheduler_of(executor).header(executor, cluster, "job")
    executor = lxm3.GridEngine()
    executor.resources["arch"] = "x\r"
    with pytest.raises(ValueError, match=r"arch: 'x\\r' contains a carriage return"):
        lxm3.scheduler_of(executor).header(executor, cluster, "job")


@pytest.mark.parametrize("section, settings, requirements, name", [
    ("slurm", 'gpu_types = {A100 = "a100\\nrm -rf ~"}', {"a100": 1}, "[clusters.slurm] gpu_types"),
    ("sge", 'parallel_environment = "smp\\n"', {"cpu": 4}, "[clusters.sge] parallel_environment"),
    ("sge", 'memory_resource = "h_vmem\\r"', {"ram": 1 << 30}, "[clusters.sge] memory_resource"),
    ("sge", 'gpu_resource = "gpu\\u001b"', {"gpu": 1}, "[clusters.sge] gpu_resource"),
    ("sge", 'gpu_type_resource = "t\\n"\ngpu_types = {A100 = "a"}', {"a100": 1},
     "[clusters.sge] gpu_type_resource"),
    ("sge", 'gpu_type_resource = "t"\ngpu_types = {A100 = "a\\n"}', {"a100": 1},
     "[clusters.sge] gpu_types"),
])
def test_site_names_from_the_config_are_checked(tmp_path, section, settings, requirements, name):
    path = tmp_path / "lxm.toml"
    path.write_text(f'[[clusters]]\nname = "c"\n[clusters.{section}]\n{settings}\n')
    cluster = lxm3.Config.from_file(str(path)).cluster()
    executor = (lxm3.Slurm if section == "slurm" else lxm3.GridEngine)(
        requirements=xm.JobRequirements(**requirements))
    with pytest.raises(ValueError, match=rf"^{re.escape(name)}: .* contains "):
        lxm3.scheduler_of(executor).header(executor, cluster, "job")


# -- End to end: the job.sh a dry run writes -------------------------------------

LAUNCHER = """\
    from lxm3 import xm, xm_cluster

    with xm_cluster.create_experiment(experiment_title={title!r}) as experiment:
        executor = xm_cluster.{kind}(**{options})
        spec = xm_cluster.PythonPackage(path={project!r},
                                        entrypoint=xm_cluster.ModuleName("echoapp.main"))
        [exe] = experiment.package([xm.Packageable(spec, executor_spec=executor.Spec())])
        experiment.add(xm_cluster.ArrayJob(exe, executor, args=[{{"seed": 1}}, {{"seed": 2}}]))
"""

# Values that look like line breaks but are not control characters: they stay
# inside their directive line.
NEAR_MISSES = {
    "Slurm": {"partition": "gpu\\n#SBATCH --uid=0", "account": "acct\u2028rm -rf ~",
              "extra_directives": ["--comment=a\u2029b", "#SBATCH --mail-type=END"],
              "resources": {"constraint": "a100&\u00a0x"}},
    "GridEngine": {"queue": "all.q\\r", "project": "p\u2028echo pwned",
                   "extra_directives": ["-l arch=x\\n-u root"], "resources": {"h_rt": "1:00:00"}},
}


def dry_run(tmp_path, echo_project, kind, options, title="dry run"):
    config = tmp_path / "lxm.toml"
    config.write_text('[[clusters]]\nname = "c"\nserver = "login.example"\n')
    launcher = tmp_path / "launcher.py"
    launcher.write_text(textwrap.dedent(LAUNCHER).format(
        title=title, kind=kind, options=repr(options), project=echo_project))
    return lxm3_cli("launch", "--dry-run", str(launcher), "--lxm_config", str(config),
                    cwd=str(tmp_path), env={"TMPDIR": str(tmp_path)}, timeout=600)


@pytest.mark.parametrize("kind", ["Slurm", "GridEngine"])
def test_near_misses_stay_inside_their_directive_line(tmp_path, echo_project, kind):
    options = NEAR_MISSES[kind]
    proc = dry_run(tmp_path, echo_project, kind, options, title="near\nmiss")
    assert proc.returncode == 0, proc.stderr
    [script] = [os.path.join(d, f) for d, _, files in os.walk(str(tmp_path))
                for f in files if f == "job.sh"]
    with open(script, encoding="utf-8") as f:
        lines = f.read().split("\n")
    prefix = "#SBATCH" if kind == "Slurm" else "#$"
    header = lines[1:lines.index(next(line for line in lines if line.startswith("# Written by")))]
    assert all(line.startswith(prefix + " ") for line in header), header
    values = [v for v in options.values() if isinstance(v, str)]
    values += [v.replace("#SBATCH", "").strip() for v in options.get("extra_directives", [])]
    values += list(options["resources"].values())
    for value in values:
        [line] = [line for line in lines if value in line]
        assert line in header
    assert sum(line.startswith(prefix) for line in lines) == len(header)
    # The title's newline became part of a name: the job name is one word.
    name = re.escape(f"{prefix} {'--job-name=' if kind == 'Slurm' else '-N '}near_miss_")
    assert [line for line in header if re.fullmatch(rf"{name}\d+_1", line)], header
    subprocess.run(["bash", "-n", script], check=True)


def test_a_launch_with_a_newline_in_a_directive_writes_no_job_script(tmp_path, echo_project):
    proc = dry_run(tmp_path, echo_project, "Slurm", {"extra_directives": ["--comment=a\nid"]})
    assert proc.returncode == 1
    assert "Slurm(extra_directives=...): '--comment=a\\nid' contains a newline" in proc.stderr
    assert not [f for _, _, files in os.walk(str(tmp_path)) for f in files if f == "job.sh"]
