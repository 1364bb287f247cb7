"""Build throughput and memory of `data build` on a folder of generated page images.

    python benchmarks/data_build.py --pages 2000 --workdir runs/bench-data --workers 1,2

Writes PAGES page images (A5 at 150 dpi, 874x1240, a dozen lines of printed text each,
PNG) with .md transcripts, then times `build_dataset("folder", ...)` once per --workers
setting, side by side, while a thread samples this process's resident memory (RSS) every
0.2 s. Prints and returns images/s and the peak RSS within each quarter of the build:
flat RSS means pages are streamed, not held (worker processes hold one image each).
"""

from __future__ import annotations

import argparse
import json
import shutil
import threading
import time
from pathlib import Path


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def make_pages(folder: Path, n: int, seed: int = 0) -> None:
    import random

    from PIL import Image, ImageDraw, ImageFont

    from data_prep.render import font_files

    rng = random.Random(seed)
    font = ImageFont.truetype(str(font_files("matplotlib:DejaVuSerif.ttf")[0]), 26)
    words = "the of invoice total date received amount payable account reference signed witness page".split()
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        lines = [f"Page {i}"] + [" ".join(rng.choice(words) for _ in range(rng.randint(4, 8))) for _ in range(12)]
        im = Image.new("RGB", (874, 1240), "white")
        draw = ImageDraw.Draw(im)
        for k, line in enumerate(lines):
            draw.text((60, 60 + 90 * k), line, fill=(20, 20, 30), font=font)
        im.save(folder / f"page_{i:05d}.png")
        (folder / f"page_{i:05d}.md").write_text("\n\n".join(lines) + "\n")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=2000)
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-data"))
    parser.add_argument("--workers", default="1,2", help="comma-separated settings to compare (0 = one per core)")
    args = parser.parse_args(argv)
    scans, out = args.workdir / "scans", args.workdir / "dataset"
    if not scans.is_dir() or len(list(scans.glob("*.png"))) != args.pages:
        shutil.rmtree(scans, ignore_errors=True)
        t = time.perf_counter()
        make_pages(scans, args.pages)
        print(f"generated {args.pages} pages in {time.perf_counter() - t:.0f} s")
    runs = [_timed_build(scans, out, args.pages, int(w)) for w in args.workers.split(",")]
    summary = {"pages": args.pages, "runs": runs}
    if len(runs) > 1:
        summary["speedup"] = round(runs[-1]["images_per_s"] / runs[0]["images_per_s"], 2)
    print(json.dumps(summary, indent=2))
    return summary


def _timed_build(scans: Path, out: Path, pages: int, workers: int) -> dict:
    from data_prep.build import build_dataset

    samples: list[tuple[float, float]] = []
    done = threading.Event()

    def sample():
        while not done.is_set():
            samples.append((time.perf_counter(), _rss_mb()))
            time.sleep(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    start_rss = _rss_mb()
    t0 = time.perf_counter()
    thread.start()
    result = build_dataset("folder", scans, out, overwrite=True, progress=False, workers=workers)
    elapsed = time.perf_counter() - t0
    done.set()
    thread.join()
    quarters = []
    for lo, hi in ((0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.01)):
        window = [r for t, r in samples if lo * elapsed <= t - t0 < hi * elapsed]
        quarters.append(round(max(window, default=start_rss)))
    return {
        "workers": workers,
        "accepted": result.report["counts"]["accepted"],
        "seconds": round(elapsed, 1),
        "images_per_s": round(pages / elapsed, 1),
        "rss_mb_before": round(start_rss),
        "rss_mb_peak_by_quarter": quarters,
        "dataset_mb": round(sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 2**20),
    }


if __name__ == "__main__":
    main()
