"""The wheel a user installs: built from this repository, its only top-level name is ``prunelab``, and installed
outside the checkout it runs ``prunelab version``, ``prunelab ls`` and ``prunelab cp debug ./r.yaml && prunelab run
./r.yaml`` offline to the end, from an empty folder.

How it is installed, and why that is a fair test of a fresh install without downloading torch again:

- ``pip wheel --no-deps --no-build-isolation . -w DIST``: the project's own wheel only (build isolation would
  download setuptools; CI is offline), built by the setuptools the test environment already has, from a copy of
  the checkout without its build leftovers (setuptools reuses ``build/lib``, where a module deleted since the last
  build would still be, and the editable install's ``*.egg-info``);
- ``pip install --no-deps --target SITE WHEEL``: the wheel's files alone in a folder of their own, with its console
  script in ``SITE/bin/prunelab`` (its shebang is this interpreter, which has torch & co.);
- every command runs with ``PYTHONPATH=SITE``, from an empty temporary folder. A fresh venv created with
  ``--system-site-packages`` would not see the project's ``.venv`` packages (they are not the system's), and a
  plain venv would have to download torch. Here the dependencies come from the test environment, but prunelab
  itself cannot come from the checkout: the checkout is not on ``sys.path`` (the cwd is empty, the script's folder
  is ``SITE/bin``), and the editable install's finder (setuptools ``__editable__`` .pth) is APPENDED to
  ``sys.meta_path``, after the path finder that finds ``SITE/prunelab`` first. The test proves it: the
  ``prunelab`` module's file lies under SITE, and neither the checkout's ``pipeline`` nor ``stages`` is imported.

Written against the final layout (after the lead's rename, ``pipeline/`` → ``prunelab``); the expected names are
the constants below. pyproject.toml needs, for that layout (setuptools >= 68)::

    [tool.setuptools]
    package-dir = {"prunelab" = "pipeline", "prunelab.stages" = "stages", "prunelab.recipes" = "recipes",
                   "prunelab.recipes.data" = "tests/data"}
    packages = ["prunelab", "prunelab.stages", <every stages/ subpackage as prunelab.stages.X>,
                "prunelab.recipes", "prunelab.recipes.data"]
    [tool.setuptools.package-data]
    "prunelab.recipes" = ["*.yaml", "**/*.yaml"]
    "prunelab.recipes.data" = ["tiny_corpus.txt"]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "prunelab"  # the one top-level import name the wheel may install
CLI_MODULE = "prunelab"  # python -m CLI_MODULE == the prunelab command
SHIPPED = ["prunelab/recipes/debug.yaml", "prunelab/recipes/smollm2/flap-20.yaml", "prunelab/recipes/data/tiny_corpus.txt"]
CHECKOUT_PACKAGES = ("pipeline", "stages")  # the checkout's folders: must never be imported by the installed wheel


def _top_level(wheel: Path) -> set[str]:
    """Top-level names a wheel installs, read from its RECORD (the list of every file it writes)."""
    with zipfile.ZipFile(wheel) as zf:
        record = next(n for n in zf.namelist() if n.endswith(".dist-info/RECORD"))
        paths = [line.split(",")[0] for line in zf.read(record).decode().splitlines() if line]
        names = set(zf.namelist())
    assert all(p in names for p in SHIPPED), f"shipped files missing from the wheel: {[p for p in SHIPPED if p not in names]}"
    return {p.split("/")[0].removesuffix(".py") for p in paths if not p.split("/")[0].endswith((".dist-info", ".data"))}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "bench-out", "*.pyc"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(source),
                            "-w", str(tmp / "dist")], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    [wheel] = list((tmp / "dist").glob("prunelab-*.whl"))
    site = tmp / "site"
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site),
                           str(wheel)], capture_output=True, text=True, timeout=600)
    assert inst.returncode == 0, inst.stderr[-3000:]
    empty = tmp / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PYTHONPATH=str(site), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1",
               PRUNELAB_CACHE=str(tmp / "cache"), PYTHONDONTWRITEBYTECODE="1")
    return wheel, site, empty, env


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{args}: rc {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.mark.slow
def test_wheel_installs_only_prunelab(installed):
    wheel, _, _, _ = installed
    assert _top_level(wheel) == {PACKAGE}


@pytest.mark.slow
def test_installed_wheel_runs_outside_the_checkout(installed):
    wheel, site, cwd, env = installed
    script = site / "bin" / "prunelab"
    assert script.is_file(), f"console script missing: {sorted(p.name for p in (site / 'bin').iterdir())}"
    probe = _run([sys.executable, "-c", "import sys, prunelab; print(prunelab.__file__); "
                  f"print([m for m in {CHECKOUT_PACKAGES!r} if m in sys.modules])"], cwd, env)
    file, leaked = probe.stdout.splitlines()
    assert Path(file).is_relative_to(site) and leaked == "[]"

    version = _run([str(script), "version"], cwd, env)
    assert version.stdout.startswith("prunelab ")
    assert _run([sys.executable, "-m", CLI_MODULE, "version"], cwd, env).stdout == version.stdout
    listing = _run([str(script), "ls"], cwd, env).stdout
    assert "debug " in listing and str(site) in listing  # the wheel's recipes, not the checkout's
    copied = _run([str(script), "cp", "debug", "./r.yaml"], cwd, env).stdout
    text = (cwd / "r.yaml").read_text()
    assert str(site / PACKAGE / "recipes" / "data" / "tiny_corpus.txt") in text and str(ROOT) not in text, copied
    run = _run([str(script), "run", "./r.yaml", "--no-progress"], cwd, env)
    assert "blocks 6 → 4" in run.stdout, run.stdout[-2000:]
    assert (cwd / "runs" / "debug" / "model" / "config.json").is_file()
    assert (cwd / "runs" / "debug" / "metrics.json").is_file()
    leaked = _run([sys.executable, "-c", "import sys, prunelab.cli; prunelab.cli.main(['validate', 'r.yaml']); "
                   f"print([m for m in {CHECKOUT_PACKAGES!r} if m in sys.modules])"], cwd, env).stdout.splitlines()[-1]
    assert leaked == "[]"


def test_pyproject_lists_every_package_folder():
    """The wheel's package list is explicit (pyproject maps folders to ``prunelab.*``): a new room under stages/ or a
    subpackage of pipeline/ left out of it would install a wheel that fails on import — caught here in a second."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"prunelab", "prunelab.stages"}
    for folder, prefix in (("pipeline", "prunelab"), ("stages", "prunelab.stages")):
        found |= {f"{prefix}.{p.parent.relative_to(ROOT / folder).as_posix().replace('/', '.')}"
                  for p in (ROOT / folder).rglob("__init__.py") if p.parent != ROOT / folder}
    assert found <= listed, f"add to pyproject's [tool.setuptools] packages: {sorted(found - listed)}"
