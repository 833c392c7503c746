"""Two launches that package one project at the same moment.

pip and setuptools build a local project in its own ``build/`` directory, so
two builds at once take files from each other: one archive came out without
the project's package (seen with two launches started together). The second
build now waits for the first and uses its archive.
"""

import os
import subprocess
import sys
import time
import zipfile

from conftest import ROOT, write_files

BUILD = """\
    import sys
    import lxm3
    spec = lxm3.PythonPackage(lxm3.ModuleName("slowpkg.main"), path=sys.argv[1])
    print("ARCHIVE", lxm3.build_archive(spec).path)
"""


def test_the_second_build_of_a_project_waits_and_reuses_the_first(tmp_path):
    project = write_files(tmp_path / "slow", {
        "pyproject.toml": '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
                          '[project]\nname = "slowpkg"\nversion = "1.0"\n',
        # setup.py runs inside the build: it holds the first build for a while.
        "setup.py": "import time\nfrom setuptools import setup\ntime.sleep(3)\nsetup(packages=['slowpkg'])\n",
        "slowpkg/__init__.py": "",
        "slowpkg/main.py": "print('hi')\n",
    })
    env = {**os.environ, "PYTHONPATH": ROOT}
    first = subprocess.Popen([sys.executable, "-c", BUILD.replace("    ", ""), project], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and first.poll() is None:
        if os.path.isdir(os.path.join(project, "build")) or os.path.isdir(os.path.join(project, "slowpkg.egg-info")):
            break  # the first build is under way in the project's directory
        time.sleep(0.05)
    second = subprocess.run([sys.executable, "-c", BUILD.replace("    ", ""), project], env=env,
                            capture_output=True, text=True, timeout=300)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0 and second.returncode == 0, (err, second.stderr)
    assert "packaging" in err and "built slow-" in err
    assert "unchanged, using" in second.stderr and "packaging" not in second.stderr, second.stderr
    [path] = {line.split(" ", 1)[1] for line in (out + second.stdout).splitlines() if line.startswith("ARCHIVE ")}
    with zipfile.ZipFile(path) as archive:
        assert {"slowpkg/__init__.py", "slowpkg/main.py"} <= set(archive.namelist())
