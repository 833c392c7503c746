"""Content-named files on the cluster are what their names say, and the copy line
says what was really copied.

Archives and images are staged under a name with their sha256 and sent with
``rsync --ignore-existing``: a truncated or substituted file would be trusted
for good. ``verify_staged_files`` checks each against its full sha256 (once;
then a stamp beside it stands for the check while the file's size, times and
inode stay the same) and replaces a bad one.

Launches are real ``python -m lxm3 launch`` runs on the test bed's Slurm, over
SSH and on the login node (see cluster_helpers). Images are checked with the
deployment functions themselves over a real SSH connection and on this
machine, with a stand-in image file: the test bed cannot run Singularity, and
only the staged bytes matter here.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import zipfile
from typing import Dict, Tuple

import pytest
from cluster_helpers import (
    ClusterWorkspace,
    archive_files,
    job_unit,
    path_without,
)

import lxm3

from testbed_env import require_testbed

pytestmark = pytest.mark.testbed


def sha256_of(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def stamp_of(path: str) -> str:
    return os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".verified")


def identity(path: str) -> Tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns, st.st_size


def name_digest(path: str) -> str:
    """The sha256 prefix in a content-named file's name."""
    match = re.search(r"-([0-9a-f]{16})\.[a-z]+$", os.path.basename(path))
    assert match, path
    return match.group(1)


def substitute_main(archive: str) -> None:
    """Replace the archive by another valid zip of the same size class, name and mtime,
    whose task program reports "substituted" instead of its arguments."""
    st = os.stat(archive)
    with zipfile.ZipFile(archive) as zf:
        entries = [(info, zf.read(info)) for info in zf.infolist()]
    replaced = archive + ".new"
    with zipfile.ZipFile(replaced, "w", zipfile.ZIP_DEFLATED) as zf:
        for info, data in entries:
            if info.filename.endswith("echoapp/main.py"):
                data = data.replace(b'"argv": sys.argv[1:]', b'"argv": ["substituted"]')
                assert b"substituted" in data
            zf.writestr(info, data)
    os.chown(replaced, st.st_uid, st.st_gid)
    os.chmod(replaced, 0o600)
    os.replace(replaced, archive)
    os.utime(archive, ns=(st.st_atime_ns, st.st_mtime_ns))  # as `rsync --times` would leave it


@pytest.mark.parametrize("mode", ["ssh", "login"])
def test_archive_is_reported_copied_once_verified_and_replaced_when_bad(cluster_workspaces, mode):
    tb = require_testbed("slurm")
    ws: ClusterWorkspace = cluster_workspaces(tb, "slurm", mode)
    outs, launches = [], []

    def launch(n: int):
        out = ws.out_dir(f"out{n}")
        result = ws.launch([job_unit(ws.executor(), args={"launch": n})],
                           exe_env={"ECHO_OUT": out}).check()
        outs.append(out)
        launches.append(result)
        [report] = ws.wait_for_reports(out, 1, result).values()
        return result, report

    # 1. The first launch copies the archive and says so; it is checked and stamped.
    first, report = launch(0)
    assert report["argv"] == ["--launch=0"]
    assert "sending job scripts and any archives not there yet" in first.stderr, first.describe()
    assert re.search(r": copied 1 archive \(\d+ KiB\) and 1 job script\n", first.stderr), first.describe()
    [archive] = archive_files(ws)
    assert sha256_of(archive).startswith(name_digest(archive))
    stamp = identity(stamp_of(archive))

    # 2. Unchanged project: nothing but the job script is copied, the line says so,
    # and the archive is not hashed again (its stamp is left as it was).
    second, report = launch(1)
    assert report["argv"] == ["--launch=1"]
    assert ": archives already there; copied 1 job script\n" in second.stderr, second.describe()
    assert "copied 1 archive" not in second.stderr, second.describe()
    assert "did not match" not in second.stderr, second.describe()
    assert identity(stamp_of(archive)) == stamp, "the archive was hashed again"

    # 3. A truncated archive (a broken transfer, a full disk) is replaced, not trusted.
    size = os.path.getsize(archive)
    with open(archive, "r+b") as f:
        f.truncate(size // 2)
    third, report = launch(2)
    assert report["argv"] == ["--launch=2"], third.describe()
    assert re.search(rf"archives/{re.escape(os.path.basename(archive))} did not match its content hash",
                     third.stderr), third.describe()
    assert re.search(r": copied 1 archive \(\d+ KiB\)\n", third.stderr), third.describe()
    assert os.path.getsize(archive) == size
    assert sha256_of(archive).startswith(name_digest(archive))

    # 4. Another valid zip under the same name (same mtime): the tasks run the right code.
    substitute_main(archive)
    fourth, report = launch(3)
    assert report["argv"] == ["--launch=3"], f"the substituted archive ran\n{fourth.describe()}"
    assert "did not match its content hash" in fourth.stderr, fourth.describe()
    assert sha256_of(archive).startswith(name_digest(archive))


# --- the deployment functions on a real staging directory ----------------------


def make_tree(root: str, files: Dict[str, bytes]) -> Tuple[str, Dict[str, str]]:
    """A deployment tree like prepare_cluster_launch's: links to content-named local files."""
    tree = os.path.join(root, "tree")
    digests = {}
    for folder_name, data in files.items():
        folder, name = folder_name.split("/")
        digest = hashlib.sha256(data).hexdigest()
        stem, ext = os.path.splitext(name)
        local = os.path.join(root, "local", f"{stem}-{digest[:16]}{ext}")
        os.makedirs(os.path.dirname(local), exist_ok=True)
        with open(local, "wb") as f:
            f.write(data)
        os.makedirs(os.path.join(tree, folder), exist_ok=True)
        os.symlink(local, os.path.join(tree, folder, os.path.basename(local)))
        digests[f"{folder}/{os.path.basename(local)}"] = digest
    return tree, digests


@pytest.fixture(params=["ssh", "login"])
def staging(request, cluster_workspaces, tmp_path):
    """(connection, info) for a fresh staging directory: over SSH to the test bed,
    or on this machine (a cluster without server)."""
    tb = require_testbed("ssh")
    ws = cluster_workspaces(tb, "slurm", request.param)
    if request.param == "ssh":
        cluster = lxm3.ClusterConfig(name="tb", server=tb.ssh_host, user=tb.ssh_user,
                                     port=tb.ssh_port if tb.ssh_port != 22 else None,
                                     staging=ws.staging)
        connection = lxm3.Connection(cluster)
        info = lxm3.probe_cluster(connection, lxm3.SCHEDULERS["slurm"])
    else:
        connection = lxm3.Connection(lxm3.ClusterConfig(name="here"))
        path = str(tmp_path / "staging")
        os.mkdir(path)
        info = lxm3.ClusterInfo(staging=path, home=str(tmp_path))
    yield connection, info
    connection.close()


def send_and_verify(connection, info, tree, digests):
    copied = lxm3.send_staging_tree(connection, info, tree)
    lxm3.verify_staged_files(connection, info, tree, digests)
    return copied


def test_images_are_verified_stamped_and_replaced(staging, tmp_path, capsys):
    connection, info = staging
    image_bytes = os.urandom(3 * 2**20)
    tree, digests = make_tree(str(tmp_path), {"archives/app.zip": os.urandom(2**20),
                                              "images/fake.sif": image_bytes})
    image_key = next(p for p in digests if p.startswith("images/"))
    image = os.path.join(info.staging, image_key)

    copied = send_and_verify(connection, info, tree, digests)
    assert sorted(path for path, _ in copied) == sorted(digests)
    err = capsys.readouterr().err
    assert re.search(r"copied 1 archive \(1\.0 MiB\) and 1 image \(3\.0 MiB\)\n", err), err
    with open(image, "rb") as f:
        assert f.read() == image_bytes
    stamp = identity(stamp_of(image))

    # Unchanged: nothing copied, nothing hashed again.
    assert send_and_verify(connection, info, tree, digests) == []
    err = capsys.readouterr().err
    assert ": archives and images already there\n" in err, err  # this tree has no job scripts
    assert identity(stamp_of(image)) == stamp

    # Truncated: replaced.
    with open(image, "r+b") as f:
        f.truncate(1000)
    send_and_verify(connection, info, tree, digests)
    err = capsys.readouterr().err
    assert f"{image_key} did not match its content hash" in err, err
    with open(image, "rb") as f:
        assert f.read() == image_bytes

    # Same size, same mtime, other bytes: replaced.
    st = os.stat(image)
    with open(image, "r+b") as f:
        f.write(b"\0" * 4096)
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    send_and_verify(connection, info, tree, digests)
    assert f"{image_key} did not match its content hash" in capsys.readouterr().err
    with open(image, "rb") as f:
        assert f.read() == image_bytes

    # A lost stamp: hashed again (and stamped), the good file is kept.
    kept = identity(image)
    os.unlink(stamp_of(image))
    send_and_verify(connection, info, tree, digests)
    assert "did not match" not in capsys.readouterr().err
    assert identity(image) == kept
    assert os.path.exists(stamp_of(image))


def test_a_file_still_wrong_after_sending_it_again_is_an_error(staging, tmp_path):
    connection, info = staging
    tree, digests = make_tree(str(tmp_path), {"archives/app.zip": b"the archive"})
    [key] = digests
    with open(os.path.realpath(os.path.join(tree, key)), "wb") as f:
        f.write(b"damaged in the local cache")  # the name no longer matches the content
    with pytest.raises(lxm3.ClusterError, match=rf"{re.escape(key)} .*still does not match its "
                                                rf"sha256 {digests[key]} .*the local file"):
        send_and_verify(connection, info, tree, digests)


def test_without_sha256sum_python_checks_the_same_way(tmp_path, monkeypatch, capsys):
    """A cluster without sha256sum (nor GNU stat): python3 hashes and stamps, and
    a good stamp spares the next launch the hashing there too."""
    connection = lxm3.Connection(lxm3.ClusterConfig(name="here"))
    path = str(tmp_path / "staging")
    os.mkdir(path)
    info = lxm3.ClusterInfo(staging=path, home=str(tmp_path))
    data = os.urandom(2**20)
    tree, digests = make_tree(str(tmp_path), {"archives/app.zip": data})
    [key] = digests
    staged = os.path.join(path, key)
    send_and_verify(connection, info, tree, digests)  # sha256sum and GNU stat
    with open(stamp_of(staged)) as f:
        assert f.read().startswith(digests[key] + " ")

    bindir = path_without(str(tmp_path), "sha256sum", "stat")
    monkeypatch.setenv("PATH", bindir)
    assert shutil.which("sha256sum") is None and shutil.which("stat") is None
    os.unlink(stamp_of(staged))
    send_and_verify(connection, info, tree, digests)  # hashed by python3
    with open(stamp_of(staged)) as f:
        assert f.read().startswith(digests[key] + " ")
    stamp = identity(stamp_of(staged))
    send_and_verify(connection, info, tree, digests)
    assert identity(stamp_of(staged)) == stamp, "hashed again although the stamp was good"

    with open(staged, "r+b") as f:
        f.write(b"x")
    send_and_verify(connection, info, tree, digests)
    assert f"{key} did not match its content hash" in capsys.readouterr().err
    with open(staged, "rb") as f:
        assert f.read() == data
    assert glob.glob(os.path.join(path, "archives", ".*.verified")) == [stamp_of(staged)]
