"""The documentation is tested like code: every Python snippet on the site and in the README runs as shown.

A page's snippets run in order, in one fresh directory, as a reader following the page would run
them; a snippet whose first line is ``# torchrun --nproc_per_node=N FILE`` runs under torchrun.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess

import pytest
from conftest import PYTHON, REPO_ROOT, subprocess_env

import ckptio

PAGES = sorted(
    os.path.relpath(p, REPO_ROOT)
    for p in [
        os.path.join(REPO_ROOT, "README.md"),
        *glob.glob(os.path.join(REPO_ROOT, "docs", "**", "*.md"), recursive=True),
    ]
)
SNIPPET = re.compile(r"^```python\n(.*?)^```", re.M | re.S)
TORCHRUN = re.compile(r"# torchrun --nproc_per_node=(\d+) \S+\.py")


def snippets(page: str) -> list[str]:
    return SNIPPET.findall(open(os.path.join(REPO_ROOT, page)).read())


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if snippets(p)])
def test_every_snippet_of_the_page_runs_as_shown(page, tmp_path):
    for i, code in enumerate(snippets(page)):
        script = tmp_path / f"snippet{i}.py"
        script.write_text(code)
        launcher = TORCHRUN.match(code.splitlines()[0])
        cmd = [PYTHON, str(script)]
        if launcher:
            cmd = [
                PYTHON,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={launcher.group(1)}",
                str(script),
            ]
        proc = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(CKPTIO_CACHE_DIR=str(tmp_path / "cache")),
                              capture_output=True, text=True, timeout=180)  # fmt: skip
        assert proc.returncode == 0, f"{page}, snippet {i + 1}:\n{code}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        assert "CheckpointWarning" not in proc.stderr, f"{page}, snippet {i + 1} warns:\n{proc.stderr[-2000:]}"


def test_the_readme_opens_with_the_two_commands_and_stays_short():
    readme = open(os.path.join(REPO_ROOT, "README.md")).read()
    block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1).strip().splitlines()
    assert [line.split()[:2] for line in block] == [["make", "demo"], ["make", "test"]]
    assert readme.index("```bash") < readme.index("\n## ")  # before anything else
    assert len(readme.splitlines()) <= 160


def test_troubleshooting_explains_every_error_type():
    page = open(os.path.join(REPO_ROOT, "docs", "troubleshooting.md")).read()
    errors = [
        n for n in ckptio.__all__ if isinstance(getattr(ckptio, n), type) and issubclass(getattr(ckptio, n), Exception)
    ]
    assert len(errors) >= 10
    assert [n for n in errors if f"`{n}`" not in page] == []


def test_every_page_is_in_the_site_navigation():
    nav = open(os.path.join(REPO_ROOT, "mkdocs.yml")).read()
    pages = [os.path.relpath(p, os.path.join(REPO_ROOT, "docs")) for p in PAGES if p.startswith("docs")]
    assert [p for p in pages if f" {p}" not in nav] == []


def _paragraph_defects(page: str) -> list[str]:
    """Lines of a page that render as raw text in a paragraph though they are written as a table row or a list item
    (a blank line splitting a table, a list with no blank line before it): strict builds pass them."""
    import html

    import markdown

    text = open(os.path.join(REPO_ROOT, page)).read()
    md = markdown.Markdown(extensions=["tables", "admonition", "attr_list", "pymdownx.superfences"])
    rendered = md.convert(text)
    found = []
    for para in re.findall(r"<p>(.*?)</p>", rendered, re.S):
        for line in html.unescape(re.sub(r"<[^>]+>", "", para)).splitlines():
            if re.match(r"\s*\|.*\|\s*$", line) or re.match(r"\s*(?:[-*+]|\d+\.)\s+\S", line):
                found.append(line.strip())
    return found


@pytest.mark.parametrize("page", [p for p in PAGES if p.startswith("docs")])
def test_no_table_or_list_of_a_page_renders_as_raw_text(page):
    assert _paragraph_defects(page) == []


def test_the_render_check_sees_a_split_table_and_a_list_run_into_a_paragraph(tmp_path, monkeypatch):
    page = tmp_path / "page.md"
    page.write_text("| a | b |\n|---|---|\n| 1 | 2 |\n\n| 3 | 4 |\n\nWhat follows:\n- one\n- two\n")
    monkeypatch.setattr("test_docs.REPO_ROOT", str(tmp_path))
    assert _paragraph_defects("page.md") == ["| 3 | 4 |", "- one", "- two"]
