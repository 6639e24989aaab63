"""MkDocs hook: publish the benchmark figures of ``benchmarks/results/`` with the site.

The benchmark suite writes its PNGs beside its tables in ``benchmarks/results/``; this hook
adds them to the site as ``benchmark-results/<name>.png`` so the guides can show them
without a second copy in ``docs/``. Links to them are checked like any other link.
"""

from __future__ import annotations

import pathlib

from mkdocs.structure.files import File

RESULTS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def on_files(files, config):
    for png in sorted(RESULTS.glob("*.png")):
        files.append(File.generated(config, f"benchmark-results/{png.name}", abs_src_path=str(png)))
    return files
