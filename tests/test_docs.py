"""Every ```python block of the documentation runs, page by page, so the pages cannot rot.

The blocks of one page run in order in one namespace (a page is one script), in a temporary working
directory, with one torch thread (as the rest of the suite).
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)


def python_blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text())


def test_the_tutorials_have_code():
    for page in (
        "index.md",
        "tutorials/minimize.md",
        "tutorials/geoopt.md",
        "tutorials/fine-tuning.md",
        "tutorials/benchmarks.md",
    ):
        assert python_blocks(ROOT / "docs" / page), page


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_page_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"docs_{page.stem}"}
    for k, block in enumerate(python_blocks(page)):
        exec(compile(block, f"{page.relative_to(ROOT)}[block {k}]", "exec"), namespace)
