"""mkdocs hook: publish the experiments' figures without copying them into ``docs/``.

The experiment scripts write their PNGs to ``benchmarks/experiments/results/``; this hook adds
each of them to the site as ``results/NAME.png``, so ``docs/experiments.md`` links
``results/NAME.png`` and the figures are the ones the scripts last wrote.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "experiments" / "results"


def on_files(files: Files, config) -> Files:
    for png in sorted(RESULTS.glob("*.png")):
        files.append(File.generated(config, f"results/{png.name}", abs_src_path=str(png)))
    return files
