"""MkDocs hook: the benchmarks' pictures (benchmarks/results/*.png) are published under results/ in the site, so the
results page shows the committed figures without a second copy in docs/."""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def on_files(files: Files, config) -> Files:
    for picture in sorted(RESULTS.rglob("*.png")):
        path = "results/" + picture.relative_to(RESULTS).as_posix()
        files.append(File(path, src_dir=None, dest_dir=config["site_dir"], use_directory_urls=False))
        files.get_file_from_path(path).abs_src_path = str(picture)
    return files
