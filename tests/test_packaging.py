"""What a packager and a first-time user meet: the build's message without a C compiler,
the version in one place (``forkguard.__version__``)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import forkguard

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "LICENSE", "CHANGELOG.md")


@pytest.fixture
def source_tree(tmp_path: Path) -> Path:
    """A copy of what a build reads (from a checkout or an unpacked sdist)."""
    if not (ROOT / "setup.py").exists():
        pytest.skip("needs the source tree (a checkout or the sdist)")
    tree = tmp_path / "forkguard"
    tree.mkdir()
    for name in SOURCES:
        shutil.copy2(ROOT / name, tree / name)
    shutil.copytree(ROOT / "csrc", tree / "csrc")
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("*.so", "_native.c"))
    return tree


def test_a_build_without_a_compiler_says_what_to_install(source_tree: Path, tmp_path: Path) -> None:
    env = {**os.environ, "CC": str(tmp_path / "no-such-cc")}
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    done = subprocess.run(
        [*pip_wheel, "-w", str(tmp_path / "out"), str(source_tree)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "forkguard could not compile its C core" in output, output[-3000:]
    assert "no C compiler: " in output and "no-such-cc" in output
    assert "apt install gcc python3-dev" in output and "xcode-select --install" in output


def test_the_version_is_written_once() -> None:
    if not (ROOT / "pyproject.toml").exists():
        pytest.skip("needs the source tree (a checkout or the sdist)")
    project = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in project and not re.search(r'^version = "', project, re.M)
    assert 'version = { attr = "forkguard.__version__" }' in project
    from importlib.metadata import version

    assert version("forkguard") == forkguard.__version__
    assert f"## {forkguard.__version__} " in (ROOT / "CHANGELOG.md").read_text()


def test_a_release_build_makes_the_readme_links_absolute() -> None:
    script = ROOT / ".ci" / "project_urls.py"
    if not script.exists():
        pytest.skip("needs the source tree (a checkout or the sdist)")
    import runpy

    absolute_links = runpy.run_path(str(script))["absolute_links"]
    base = "https://example.org/r/blob/abc/"
    text = (
        "[a](docs/a.md) [b](docs/design.md#lock-order) [c](#install) "
        "[d](https://pypi.org/) ![e](benchmarks/results/plot.png) [f](mailto:x@example.org)"
    )
    assert absolute_links(text, base) == (
        f"[a]({base}docs/a.md) [b]({base}docs/design.md#lock-order) [c](#install) "
        f"[d](https://pypi.org/) ![e]({base}benchmarks/results/plot.png) [f](mailto:x@example.org)"
    )
    readme = (ROOT / "README.md").read_text()
    assert "](docs/" not in absolute_links(readme, base)
