"""The request cache's stores: one SQLite database (``sqlite``, the default) vs one JSON file
per request (``files``, the earlier store), at 10^5-10^6 entries.

Each store gets the same entries, shaped like a served student's guided-evaluation requests (a
rendered prompt of ~1.5 kB in the key, a short step as the answer), written one entry per write
as :class:`~rscaffold.llm.cache.CachedBackend` writes them (each answer persisted as it arrives):

- ``write``: N entries, one process;
- ``hit``: every entry read back (in a shuffled order), validated;
- ``miss``: N lookups of keys not stored (a cold run's first pass);
- ``concurrent``: N fresh entries written by ``--writers`` processes at once into one cache, then
  every entry checked (none lost);
- disk: bytes used (``du``) and files, and the time to delete the cache (``rm -r``).

    .venv/bin/python benchmarks/request_cache.py [--entries 100000] [--writers 4] [--dir /path/on/target/disk]

The figures depend on the file system: run it with ``--dir`` on the disk the artifacts live on.
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rscaffold.llm.base import Completion
from rscaffold.llm.cache import RequestCache

PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant that reasons step by step.<|im_end|>\n<|im_start|>user\n"
    + "A farmer has 17 sheep and buys 5 more, then sells a third of the flock. " * 16
    + "<|im_end|>\n<|im_start|>assistant\n"
)


def entry(i: int, salt: str = "") -> tuple[str, list[Completion], dict]:
    """The key, completions and key fields of entry ``i``."""
    fields = {
        "format": 1,
        "model": "openai|student-7@",
        "messages": [],
        "prompt": PROMPT + f"Step {i}{salt}: ",
        "max_new_tokens": 64,
        "temperature": 0.0,
        "stop": ["\n\n", "\n \n"],
        "options": {"add_special_tokens": False, "stop_token_ids": [49152, 49153, 49154], "skip_special_tokens": True},
        "n": 1,
    }
    key = hashlib.sha256(f"{i}{salt}".encode()).hexdigest()
    text = f"We add the {i} sheep the farmer buys to those he has, which gives the new size of the flock."
    c = Completion(
        "r", text=text, finish_reason="stop", prompt_tokens=412, completion_tokens=24, latency_s=0.031,
        extra={"stop_reason": "\n\n", "response_id": f"cmpl-{i}"},
    )  # fmt: skip
    return key, [c], fields


def write_range(root: str, store: str, *, first: int, n: int, salt: str) -> None:
    cache = RequestCache(root, store=store)
    for i in range(first, first + n):
        key, completions, fields = entry(i, salt)
        cache.put(key, completions, fields)


def writer(root: str, store: str, *, first: int, n: int, start, done) -> None:
    """A writer process: ready (imports done), waits for the common start, writes, reports when."""
    start.wait()
    write_range(root, store, first=first, n=n, salt="-c")
    done.put(time.time())


def du(path: Path) -> tuple[int, int]:
    """(bytes on disk, files) under ``path``."""
    out = subprocess.run(["du", "-sB1", str(path)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0]), sum(len(files) for _, _, files in os.walk(path))


def run_store(store: str, base: Path, *, n: int, writers: int) -> dict[str, float]:
    root = base / store
    shutil.rmtree(root, ignore_errors=True)
    figures: dict[str, float] = {}
    t0 = time.perf_counter()
    write_range(str(root), store, first=0, n=n, salt="")
    figures["write"] = time.perf_counter() - t0

    cache = RequestCache(root, store=store)
    order = list(range(n))
    random.Random(0).shuffle(order)
    t0 = time.perf_counter()
    for i in order:
        got = cache.get(entry(i)[0])
        assert got is not None and got[0]["completion_tokens"] == 24, i
    figures["hit"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    for i in range(n):
        assert cache.get(hashlib.sha256(f"absent-{i}".encode()).hexdigest()) is None
    figures["miss"] = time.perf_counter() - t0

    # the writers start together once all have imported (process start-up is not the store's)
    ctx = multiprocessing.get_context("spawn")
    share = n // writers
    start, done = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(
            target=writer, args=(str(root), store), kwargs=dict(first=k * share, n=share, start=start, done=done)
        )
        for k in range(writers)
    ]
    for p in procs:
        p.start()
    time.sleep(5.0 + 1.5 * writers)  # spawn + import of rscaffold.llm.cache on a busy machine
    t0 = time.time()
    start.set()
    ends = [done.get() for _ in procs]
    for p in procs:
        p.join()
    figures["concurrent"] = max(ends) - t0
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    missing = sum(cache.get(entry(i, "-c")[0]) is None for i in range(share * writers))
    assert missing == 0, f"{missing} entries written concurrently are missing"
    figures["entries"] = cache.count()
    figures["bytes"], figures["files"] = du(root)
    t0 = time.perf_counter()
    shutil.rmtree(root)
    figures["delete"] = time.perf_counter() - t0
    return figures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", type=int, default=100_000, help="entries per phase (10^5 default; 10^6 takes long)")
    ap.add_argument("--writers", type=int, default=4, help="concurrent writer processes")
    ap.add_argument("--dir", type=Path, default=None, help="where the caches are built (default: a temporary dir)")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="rscaffold-cache-bench-", dir=args.dir))
    try:
        fs = subprocess.run(["stat", "-f", "-c", "%T", str(base)], capture_output=True, text=True).stdout.strip()
        print(f"{args.entries} entries, {args.writers} concurrent writers, in {base} ({fs}), {os.cpu_count()} CPUs")
        results = {store: run_store(store, base, n=args.entries, writers=args.writers) for store in ("files", "sqlite")}
    finally:
        shutil.rmtree(base, ignore_errors=True)
    old, new = results["files"], results["sqlite"]
    n = args.entries
    print(f"\n{'phase':<34}{'files (old)':>14}{'sqlite (new)':>14}{'new/old':>10}")
    for phase, what in (
        ("write", f"write {n} (one process)"),
        ("hit", f"read {n} hits (shuffled)"),
        ("miss", f"look up {n} misses"),
        ("concurrent", f"write {n} ({args.writers} processes)"),
        ("delete", f"delete the cache ({2 * n} entries)"),
    ):
        print(f"{what:<34}{old[phase]:>12.2f} s{new[phase]:>12.2f} s{new[phase] / old[phase]:>10.3f}")
    for phase in ("write", "hit", "miss", "concurrent"):
        print(f"  {phase:<10} entries/s: files {n / old[phase]:>10.0f}   sqlite {n / new[phase]:>10.0f}")
    print(
        f"{'disk (du)':<34}{old['bytes'] / 2**20:>11.1f} MB{new['bytes'] / 2**20:>11.1f} MB{new['bytes'] / old['bytes']:>10.3f}"
    )
    print(f"{'files':<34}{old['files']:>14.0f}{new['files']:>14.0f}")
    print(f"{'entries stored':<34}{old['entries']:>14.0f}{new['entries']:>14.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
