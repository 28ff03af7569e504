"""MkDocs hook: each study's README under ``experiments/`` becomes a page of the site, with its figures.

The studies live beside their scripts and results (``experiments/<name>/``), where ``run.sh`` reproduces them; the
site reads them from there at build time rather than keeping a second copy that could drift.
"""

from __future__ import annotations

from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
FIGURES = (".png", ".svg")


def studies() -> list[Path]:
    return sorted(p.parent for p in EXPERIMENTS.glob("*/README.md"))


def on_files(files, config):  # noqa: ANN001 - MkDocs' hook signature
    from mkdocs.structure.files import File

    for folder in studies():
        files.append(File.generated(config, f"studies/{folder.name}/index.md",
                                    abs_src_path=str(folder / "README.md")))
        for figure in sorted(p for p in folder.rglob("*") if p.suffix in FIGURES):
            files.append(File.generated(config, f"studies/{folder.name}/{figure.relative_to(folder).as_posix()}",
                                        abs_src_path=str(figure)))
    return files
