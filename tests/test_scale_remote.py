"""A DVC remote carries the pipeline's artifacts to a fresh clone: pull, and nothing needs rerunning."""

import shutil
import subprocess

import yaml

from test_flow import ROOT, _dvc, _git, _lock_outs


def test_push_then_pull_into_a_fresh_clone_is_up_to_date(tiny_project, tmp_path_factory, monkeypatch):
    for var in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME"):
        monkeypatch.setenv(var, "cpet test")
    for var in ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"):
        monkeypatch.setenv(var, "test@cpet.invalid")
    root, params = tiny_project
    (root / "params.yaml").write_text(yaml.safe_dump(params.model_dump(by_alias=True, mode="json"), sort_keys=False))
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(ROOT / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__"))  # code deps
    # The tiny base model and task data stand in for `fetch` (network) and so are git's here;
    # everything the stages write goes through DVC's cache and the remote.
    (root / ".gitignore").write_text("/.cache\n")
    remote = tmp_path_factory.mktemp("remote")  # a local/NFS remote: `dvc remote add -d team /mnt/nfs/...`
    _git(root, "init", "-q")
    _dvc(root, "init", "-q")
    _dvc(root, "remote", "add", "-d", "team", str(remote))
    stages = ("validate", "compress@int8")
    _dvc(root, "repro", "-s", *stages)
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "tiny project, validated and compressed")
    _dvc(root, "push")
    assert any(p.is_file() for p in remote.rglob("*"))

    clone = tmp_path_factory.mktemp("clone") / "cpet"
    subprocess.run(["git", "clone", "-q", str(root), str(clone)], check=True, capture_output=True)
    assert not (clone / "models/compressed/int8").exists()  # DVC's, not git's
    assert "not in cache" in _dvc(clone, "status", *stages)
    _dvc(clone, "pull", *stages)
    assert "up to date" in _dvc(clone, "status", *stages)  # nothing to rerun
    out = "compress@int8:models/compressed/int8"
    assert _lock_outs(clone)[out] == _lock_outs(root)[out]
    for f in (root / "models/compressed/int8").rglob("*"):
        if f.is_file():
            assert (clone / f.relative_to(root)).read_bytes() == f.read_bytes()
