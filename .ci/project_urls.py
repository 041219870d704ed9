"""Give a release build its repository's addresses: ``python .ci/project_urls.py URL REF``.

README.md links to the repository's files by relative paths, which GitHub resolves and
PyPI cannot (the README is the package page there).  Before building, the wheel
workflow runs this with the repository's address and the commit being built: each
relative link in README.md becomes an absolute one to that commit's file, and
pyproject.toml gets the [project.urls] table (source, changelog, issues, docs).  The
checkout is changed in place; nothing of it is committed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

# A Markdown link or image whose target is neither absolute, nor an anchor, nor mail.
RELATIVE = re.compile(r"(\]\()(?![a-z][a-z0-9+.-]*:|#|/)([^)\s]+)(\))", re.IGNORECASE)


def absolute_links(text: str, base: str) -> str:
    return RELATIVE.sub(lambda m: f"{m[1]}{base}{m[2]}{m[3]}", text)


def urls_table(repository: str, ref: str) -> str:
    return (
        "\n[project.urls]\n"
        f'Source = "{repository}"\n'
        f'Changelog = "{repository}/blob/{ref}/CHANGELOG.md"\n'
        f'Issues = "{repository}/issues"\n'
        f'Documentation = "{repository}/tree/{ref}/docs"\n'
    )


def main(argv: list[str]) -> int:
    if len(argv) != 3 or not argv[1].startswith("https://"):
        print(__doc__.splitlines()[0], file=sys.stderr)
        return 2
    repository, ref = argv[1].rstrip("/"), argv[2]
    root = Path(__file__).resolve().parent.parent
    readme, project = root / "README.md", root / "pyproject.toml"
    base = f"{repository}/blob/{ref}/"
    readme.write_text(absolute_links(readme.read_text("utf-8"), base), "utf-8")
    text = project.read_text("utf-8")
    if "[project.urls]" not in text:
        # (appended after everything: a TOML table runs to the next header)
        project.write_text(text.rstrip("\n") + "\n" + urls_table(repository, ref), "utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
