"""Which engine folder opens when none is named (runtime/locate.py), and what ``dalle2-rt info`` / ``--version`` say.

The order: the folder given -> $DALLE2_RT_ENGINES -> the clone's engines/shapes-v2 -> the package's copy. Tested
on a fake layout (a repository with setup.py, and the same package installed without one), so the order is
checked whatever this checkout holds.
"""
from __future__ import annotations

import json
import shutil
from importlib.metadata import version
from pathlib import Path

import pytest

import dalle2_rt
from dalle2_rt import cli
from dalle2_rt.runtime import locate
from dalle2_rt.runtime.errors import EngineFolderError
from dalle2_rt.runtime.pipeline import Pipeline

MANIFEST = locate.MANIFEST


def _folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / MANIFEST).write_text("{}")
    return path


@pytest.fixture
def layout(tmp_path, monkeypatch):
    """A clone at tmp/repo (setup.py, engines/shapes-v2, dalle2_rt/engines/shapes-v2) as the package's home."""
    repo = tmp_path / "repo"
    (repo / "dalle2_rt").mkdir(parents=True)
    (repo / "setup.py").write_text("")
    monkeypatch.setattr(locate, "PACKAGE", repo / "dalle2_rt")
    monkeypatch.delenv(locate.ENV, raising=False)
    return {"clone": _folder(repo / "engines" / "shapes-v2"),
            "package": _folder(repo / "dalle2_rt" / "engines" / "shapes-v2"), "repo": repo}


def test_environment_then_clone_then_package(layout, monkeypatch, tmp_path):
    assert locate.default_engines() == layout["clone"]
    assert locate.source_of(layout["clone"]) == "the clone (make engines)"
    shutil.rmtree(layout["clone"])  # a clone that never ran make engines: the package's copy
    assert locate.default_engines() == layout["package"]
    assert locate.source_of(layout["package"]) == "the package"
    elsewhere = _folder(tmp_path / "mine")
    monkeypatch.setenv(locate.ENV, str(elsewhere))
    assert locate.default_engines() == elsewhere
    assert locate.source_of(elsewhere) == f"${locate.ENV}"
    assert locate.source_of(tmp_path) == "given (--engines / Pipeline.load)"


def test_an_installed_package_ignores_engines_beside_it(layout):
    """In site-packages there is no setup.py: a stray site-packages/engines/shapes-v2 is not a clone's."""
    (layout["repo"] / "setup.py").unlink()
    assert locate.clone_engines() is None
    assert locate.default_engines() == layout["package"]
    assert [where for where, _ in locate.lookup()] == ["the package"]


def test_a_missing_environment_folder_is_an_error_not_skipped(layout, monkeypatch, tmp_path):
    monkeypatch.setenv(locate.ENV, str(tmp_path / "nowhere"))
    assert locate.default_engines() == tmp_path / "nowhere"  # not the clone's or the package's
    with pytest.raises(EngineFolderError, match=r"\$DALLE2_RT_ENGINES names .*nowhere.*unset it"):
        Pipeline.load()


def test_none_found_says_what_a_pip_user_and_a_clone_user_do(layout):
    shutil.rmtree(layout["clone"])
    shutil.rmtree(layout["package"])
    assert locate.default_engines() == layout["package"]
    with pytest.raises(EngineFolderError) as caught:
        Pipeline.load()
    message = str(caught.value)
    assert "\n" not in message
    for what in ("pip install --force-reinstall dalle2-rt", "make engines", "make package-engines", "--engines DIR",
                 str(layout["clone"]), str(layout["package"])):
        assert what in message


def test_the_folder_given_wins_over_the_environment(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(locate.ENV, str(tmp_path / "nowhere"))
    rc = cli.main(["info", "--engines", str(locate.package_engines()), "--json"])
    facts = json.loads(capsys.readouterr().out)
    assert rc == 0 and facts["engines"] == str(locate.package_engines()) and facts["from"] == "--engines"


# --------------------------------------------------------------------------------------------------------
# dalle2-rt --version, dalle2-rt info


def test_version_is_the_package_version(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"dalle2-rt {dalle2_rt.__version__}"
    assert version("dalle2-rt") == dalle2_rt.__version__  # setup.py reads the same number


def test_info_names_the_default_folder_its_model_and_defaults(monkeypatch, capsys):
    monkeypatch.delenv(locate.ENV, raising=False)
    assert cli.main(["info", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    folder = locate.default_engines()
    assert facts["engines"] == str(folder) and facts["from"] == locate.source_of(folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert facts["model"] == manifest["name"]
    assert facts["checkpoints"] == {n: {"step": s.get("step"), "sha256": s["sha256"]}
                                    for n, s in manifest["sources"].items()}
    assert facts["defaults"]["prior"] == manifest["stages"]["prior"]["defaults"]
    assert facts["defaults"]["decoder"] == manifest["stages"]["decoder"]["defaults"]
    assert [s["step"] for s in facts["lookup"]][-1] == "the package"
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    assert f"engines   {folder}" in text and "defaults  decoder:" in text


def test_info_without_any_folder_fails_in_one_line(layout, capsys):
    shutil.rmtree(layout["clone"])
    shutil.rmtree(layout["package"])
    assert cli.main(["info"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dalle2-rt: error: the default engines are missing")
