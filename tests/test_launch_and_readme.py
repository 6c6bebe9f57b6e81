"""The README's two commands, its links into docs/, and the accelerate configs stay true."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```\n(.*?)\n```", section, re.DOTALL)


def test_readme_has_exactly_two_commands_and_ci_runs_the_test_one():
    cmds = _commands()
    assert len(cmds) == 2
    setup_and_run, setup_and_test = cmds
    assert "torch==2.13.0" in setup_and_run and "pipeline/run.py recipes/smollm2/" in setup_and_run
    assert "torch==2.13.0" in setup_and_test and "pytest" in setup_and_test
    # .ci/run extracts the block between the markers: it must be the same line
    marked = (ROOT / "README.md").read_text().split("<!-- test-command:start -->")[1].split("<!-- test-command:end -->")[0]
    assert setup_and_test in marked
    recipe = setup_and_run.rsplit(" ", 1)[1]
    assert (ROOT / recipe).is_file()


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces → '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    """README → docs/*.md → docs/results/…: each relative link names an existing file and heading."""
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md":
            headings = {_anchor(h) for h in re.findall(r"^#+ (.*)$", path.read_text(), re.MULTILINE)}
            if anchor not in headings:
                broken.append(f"{target}: no heading #{anchor}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_readme_is_a_front_page_and_the_results_live_in_docs():
    """What a newcomer reads first stays short; every benchmark table (with its markers, which
    `prunelab bench SPEC --update-readme docs/results.md` rewrites) lives in docs/results.md."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 135  # the family matrix (issue 16) lives here too
    assert "<!-- bench:" not in readme
    results = (ROOT / "docs" / "results.md").read_text()
    for name in ("smollm2-depth", "smollm2-width", "smollm2-20", "smollm2-speed"):
        assert f"<!-- bench:{name}:start -->" in results and f"<!-- bench:{name}:end -->" in results
    for room in ("core", "arch", "calibration", "criteria", "selection", "surgery", "recovery", "evaluation", "io"):
        assert room in readme.split("## Layout", 1)[1].split("\n## ", 1)[0], f"the layout names the room {room}"


@pytest.mark.parametrize("path", sorted((ROOT / "launch").glob("*.yaml")), ids=lambda p: p.name)
def test_launch_configs_parse_and_name_themselves(path):
    cfg = yaml.safe_load(path.read_text())
    assert cfg["num_processes"] >= 1 and "distributed_type" in cfg
    assert f"launch/{path.name}" in path.read_text().splitlines()[0]


def test_accelerate_launch_with_the_cpu_config(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launch/cpu-single.yaml",
         "pipeline/run.py", "recipes/debug.yaml", "--output-dir", str(tmp_path), "--no-progress"],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "debug" / "model" / "model.safetensors").is_file()
