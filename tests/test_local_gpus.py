"""Local tasks that ask for GPUs share the machine's GPUs out: no more tasks at
once than the devices allow, each with its own CUDA_VISIBLE_DEVICES (lxm3
0.4.2 ran local tasks one at a time).

This machine has no GPUs, so the devices are those CUDA_VISIBLE_DEVICES lists
in the launching environment, or those a stand-in ``nvidia-smi -L`` prints
(a script first on the PATH that lists made-up GPUs and logs its calls). The
tasks are real processes of a real local launch: each leaves a marker while
it runs, watches the others' markers (and the devices in them) until as many
tasks as may run together are there, and reports what it saw.
"""

import json
import os
import re
import shutil
import sys
import threading

import pytest

import lxm3
from lxm3 import xm

from conftest import write_files

TASK = """\
    import json, os, time
    run, me = os.environ["GPU_RUN"], os.environ["LXM_TASK_ID"]
    want, total = int(os.environ["GPU_WANT"]), int(os.environ["GPU_TOTAL"])
    devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    running = os.path.join(run, "running")
    with open(os.path.join(running, me + ".tmp"), "w") as f:
        f.write("" if devices is None else devices)
    os.replace(os.path.join(running, me + ".tmp"), os.path.join(running, me))
    peak, shared, until, deadline = 0, [], None, time.time() + 120
    while True:
        present = {}
        for name in os.listdir(running):
            try:
                with open(os.path.join(running, name)) as f:
                    present[name] = f.read()
            except FileNotFoundError:
                pass
        present = {k: v for k, v in present.items() if not k.endswith(".tmp")}
        peak = max(peak, len(present))
        mine = set((devices or "").split(",")) - {""}
        shared += [k for k, v in present.items() if k != me and mine & set(v.split(","))]
        finished = sum(n.startswith("task-") for n in os.listdir(run))
        now = time.time()
        if until is None and (len(present) >= want or finished + len(present) >= total):
            until = now + 1.0  # then watch a little longer: a task too many would show up
        if (until is not None and now > until) or now > deadline:
            break
        time.sleep(0.05)
    os.unlink(os.path.join(running, me))
    with open(os.path.join(run, "task-%s.json" % me), "w") as f:
        json.dump({"devices": devices, "peak": peak, "shared_with": shared}, f)
"""


@pytest.fixture
def gpu_app(tmp_path):
    return write_files(tmp_path / "gpuapp", {"build.sh": '#!/bin/sh\ncp task.py "$BUILDDIR"/\n',
                                             "task.py": TASK})


def launch(gpu_app, run_dir, executor, tasks, want):
    os.chmod(os.path.join(gpu_app, "build.sh"), 0o755)
    os.makedirs(os.path.join(run_dir, "running"))
    spec = lxm3.UniversalPackage(['"${LXM_PYTHON:-python3}" task.py'], "build.sh", path=gpu_app)
    env = {"GPU_RUN": str(run_dir), "GPU_WANT": str(want), "GPU_TOTAL": str(tasks)}
    with lxm3.create_experiment("gpus", config=lxm3.Config()) as experiment:
        [exe] = experiment.package([xm.Packageable(spec, executor_spec=executor.Spec(), env_vars=env)])
        experiment.add(lxm3.ArrayJob(exe, executor, args=[{}] * tasks))
    reports = []
    for task in range(tasks):
        with open(os.path.join(run_dir, f"task-{task}.json")) as f:
            reports.append(json.load(f))
    return reports


def test_gpus_from_cuda_visible_devices_are_shared_out_two_per_task(gpu_app, tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    # max_parallel_tasks=6 would run all six at once: the GPUs must be what limits them.
    executor = lxm3.Local(requirements=xm.JobRequirements(gpu=2), max_parallel_tasks=6)
    reports = launch(gpu_app, tmp_path / "run", executor, tasks=6, want=2)
    for report in reports:
        devices = report["devices"].split(",")
        assert len(devices) == 2 and set(devices) <= {"0", "1", "2", "3"}, report
        assert report["shared_with"] == [], report  # no GPU of a task running at the same time
    assert max(r["peak"] for r in reports) == 2  # two at once, never more


def test_gpus_listed_by_nvidia_smi_are_shared_out_when_cuda_visible_devices_is_unset(
        gpu_app, tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    bindir = tmp_path / "bin"
    calls = tmp_path / "nvidia-smi-calls"
    write_files(bindir, {"nvidia-smi": f"""\
        #!/bin/sh
        echo "$@" >> {calls}
        echo "GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-0f1e2d3c)"
        echo "GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-1f1e2d3c)"
        echo "  MIG 1g.5gb      Device  0: (UUID: MIG-2a3b4c5d)"
        echo "GPU 2: NVIDIA A100-SXM4-40GB (UUID: GPU-2f1e2d3c)"
        """})
    os.chmod(bindir / "nvidia-smi", 0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    # No max_parallel_tasks: three GPUs allow three tasks at once, whatever the core count.
    reports = launch(gpu_app, tmp_path / "run", lxm3.Local(xm.JobRequirements(gpu=1)), tasks=5, want=3)
    assert calls.read_text() == "-L\n"  # counted once per launch
    for report in reports:
        assert report["devices"] in ("0", "1", "2"), report
        assert report["shared_with"] == [], report
    assert max(r["peak"] for r in reports) == 3


def test_without_a_way_to_count_gpus_tasks_run_one_at_a_time_as_in_042(
        gpu_app, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi: its GPUs can be counted")
    executor = lxm3.Local(xm.JobRequirements(gpu=1))
    # want=1: each task watches 1 s for another to show up (rather than waiting
    # two minutes for a second one that, rightly, never comes).
    reports = launch(gpu_app, tmp_path / "run", executor, tasks=3, want=1)
    assert [r["devices"] for r in reports] == [None, None, None]  # the machine's GPUs, unassigned
    assert max(r["peak"] for r in reports) == 1  # one at a time, as lxm3 0.4.2 ran them
    assert re.search(r"work unit 1 asks for 1 GPU per task, but lxm3 cannot tell which GPUs this "
                     r"machine has \(nvidia-smi is not on the PATH and CUDA_VISIBLE_DEVICES is not "
                     r"set\): such tasks run one at a time", capsys.readouterr().err)
    # With max_parallel_tasks, the user bounds the tasks; no devices are assigned.
    executor = lxm3.Local(xm.JobRequirements(gpu=1), max_parallel_tasks=2)
    reports = launch(gpu_app, tmp_path / "run2", executor, tasks=2, want=2)
    assert [r["devices"] for r in reports] == [None, None]
    assert max(r["peak"] for r in reports) == 2


@pytest.mark.parametrize("visible, message", [
    ("0,1", r"asks for 3 GPUs per task, but tasks here may use 2 GPUs \(CUDA_VISIBLE_DEVICES=0,1\)"),
    ("", r"asks for 3 GPUs per task, but tasks here may use 0 GPUs \(CUDA_VISIBLE_DEVICES=\)"),
])
def test_more_gpus_per_task_than_there_are_is_refused(gpu_app, tmp_path, monkeypatch, visible, message):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    with pytest.raises(lxm3.LaunchError, match=message):
        launch(gpu_app, tmp_path / "run", lxm3.Local(xm.JobRequirements(gpu=3)), tasks=1, want=1)


def test_stop_drops_the_tasks_waiting_for_gpus(tmp_path, monkeypatch):
    """Ctrl-C (stop) while tasks wait for a GPU: they never start, and no worker hangs."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    script = tmp_path / "job.sh"
    started = tmp_path / "started"
    script.write_text(f'echo "$CUDA_VISIBLE_DEVICES" >> {started}\nexec sleep 600\n')
    runner = lxm3.LocalRunner(max_parallel=3, out=open(os.devnull, "w"))
    runner.submit(str(script), 1, 3, str(tmp_path / "logs"), gpus_per_task=1)
    deadline = threading.Event()
    for _ in range(600):  # the first task has its GPU and runs; the others wait for it
        if started.exists() and started.read_text():
            break
        deadline.wait(0.1)
    runner.stop(grace=5)
    assert started.read_text() == "7\n"  # one task ran, with the GPU
    [ran] = [(r.task_id, r.returncode != 0) for r in runner.results]  # (which one: the first to take it)
    assert ran[1], runner.results  # stopped
    assert sorted(runner.not_started) == [(1, t) for t in range(3) if t != ran[0]]
    assert not runner._workers


def test_tasks_without_gpus_need_no_gpu_count(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + ":/usr/bin:/bin")
    runner = lxm3.LocalRunner(max_parallel=2, out=open(os.devnull, "w"))
    script = tmp_path / "job.sh"
    script.write_text('echo "${CUDA_VISIBLE_DEVICES-unset}"\n')
    runner.submit(str(script), 1, 2, str(tmp_path / "logs"))  # no GPUs asked: nothing counted
    assert [r.returncode for r in runner.wait()] == [0, 0]
