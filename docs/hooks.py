"""MkDocs hook: the benchmark plots are published from ``benchmarks/results``, where the benchmarks write them
(one copy of each; the pages include the tables from there too, with ``--8<--``)."""

from __future__ import annotations

import os

from mkdocs.structure.files import File

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results")


def on_files(files, config):
    for name in sorted(os.listdir(RESULTS)):
        if name.endswith(".png"):
            files.append(File.generated(config, f"results/{name}", abs_src_path=os.path.join(RESULTS, name)))
    return files
