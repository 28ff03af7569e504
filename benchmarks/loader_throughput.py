"""Is the loader ever the bottleneck? Cells/s of Census streaming, the in-memory AnnData path and the full-size
training step, measured side by side in one process, plus peak RSS. Prints one JSON line.

    python benchmarks/loader_throughput.py --n-cells 100000

All loaders emit what training consumes: batches aligned to the 28,231-gene order and log-normalised.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_result  # noqa: E402


BUILD = '''
import sys
from scimilarity_lora.data.soma_store import pbmc_counts, write_census_store
store, h5ad, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
adata = pbmc_counts(n_cells=n, n_donors=12, seed=0)
write_census_store(adata, store)
adata.write_h5ad(h5ad)
'''


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cells_per_second(loader, warmup_batches: int, max_batches: int) -> tuple[float, float]:
    """Throughput after warm-up, and the time to the first batch."""
    t_start = time.perf_counter()
    it = iter(loader)
    first = None
    n, t0 = 0, None
    for i, (x, y) in enumerate(it):
        if first is None:
            first = time.perf_counter() - t_start
        if i == warmup_batches:
            t0, n = time.perf_counter(), 0
        n += x.shape[0]
        if i >= warmup_batches + max_batches:
            break
    return n / (time.perf_counter() - t0), first


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-cells", type=int, default=100_000)
    p.add_argument("--gene-order", default="scimilarity", help="\"scimilarity\" (the packaged order) or a gene_order.tsv")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--io-batch-size", type=int, default=16384)
    p.add_argument("--batches", type=int, default=None,
                   help="batches to time after warm-up (default: the whole training epoch, so every IO batch is read)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "loader_throughput.json"))
    args = p.parse_args()
    torch.manual_seed(0)

    from scimilarity_lora.data.anndata import AnnDataModule
    from scimilarity_lora.data.census import CensusDataModule
    from scimilarity_lora.genes import resolve_gene_order
    from scimilarity_lora.model.adapters import FinetuneConfig
    from scimilarity_lora.training.module import CellTypeClassifier
    from scimilarity_lora.model.encoder import EncoderConfig

    genes = resolve_gene_order(args.gene_order)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_loader_"))
    store, h5ad = work / "soma", work / "cells.h5ad"
    t = time.perf_counter()
    if not (store.exists() and h5ad.exists()):  # built in a child process: its memory is not ours to report
        subprocess.run([sys.executable, "-c", BUILD, str(store), str(h5ad), str(args.n_cells)], check=True)
    build_seconds = time.perf_counter() - t

    census = CensusDataModule(uri=str(store), batch_size=args.batch_size, io_batch_size=args.io_batch_size,
                              seed=0, min_cells_per_class=1)
    census.gene_order = genes
    census.setup("fit")
    epoch_batches = args.batches or len(census.datasets["train"])
    census_cps, census_first = cells_per_second(census.train_dataloader(), 5, epoch_batches)
    rss_after_census = peak_rss_mb()

    memory = AnnDataModule(path=str(h5ad), label_key="cell_type", layer="X", input_is_log1p=False,
                           donor_key="donor_id", batch_size=args.batch_size, min_cells_per_class=1, seed=0)
    memory.gene_order = genes
    memory.setup("fit")
    memory_cps, memory_first = cells_per_second(memory.train_dataloader(), 5, args.batches or len(memory.train_dataloader()))

    # the full-size training step (LoRA r=8 on all Linears), forward + backward + AdamW step
    model = CellTypeClassifier(
        encoder_config=EncoderConfig(n_genes=len(genes)).to_dict(), gene_order=genes,
        classes=list(census.labels.classes), finetune=FinetuneConfig(mode="lora", r=8).to_dict(),
        preprocessing={"target_sum": 1e4, "input_is_log1p": False},
    ).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batches = [next(iter(memory.train_dataloader())) for _ in range(3)]
    steps, n = 0, 0
    for i in range(3 + 12):
        x, y = batches[i % 3]
        if i == 3:
            t0, n = time.perf_counter(), 0
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        n += len(y)
    train_cps = n / (time.perf_counter() - t0)

    result = {
        "benchmark": "loader_throughput",
        "n_cells": args.n_cells, "n_model_genes": len(genes), "batch_size": args.batch_size,
        "timed_census_batches": epoch_batches,
        "io_batch_size": args.io_batch_size, "torch_threads": torch.get_num_threads(),
        "census_stream_cells_per_s": round(census_cps), "census_first_batch_s": round(census_first, 2),
        "in_memory_cells_per_s": round(memory_cps), "in_memory_first_batch_s": round(memory_first, 3),
        "train_step_cells_per_s": round(train_cps),
        "census_over_train_step": round(census_cps / train_cps, 2),
        "peak_rss_mb_after_census": round(rss_after_census), "peak_rss_mb": round(peak_rss_mb()),
        "store_build_s": round(build_seconds, 1),
    }
    write_result(result, args.out)


if __name__ == "__main__":
    main()
