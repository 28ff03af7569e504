"""Pretraining step throughput: our Lightning job (PretrainDataModule + PretrainModule, sparse first layer on) against a
bare PyTorch loop of the same loss on pre-built dense batches, full-size SCimilarity architecture, side by side in
one process. Prints one JSON line.

    python benchmarks/pretraining_speed.py --out benchmarks/results/pretraining_speed.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import lightning as L
import numpy as np
import pandas as pd
import torch

from scimilarity_lora.data.pretrain import PretrainDataModule
from scimilarity_lora.genes import resolve_gene_order
from scimilarity_lora.model.encoder import EncoderConfig
from scimilarity_lora.model.triplet import negatives_from_relations
from scimilarity_lora.preprocess import Preprocessing
from scimilarity_lora.training.pretrain_module import PretrainModule

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_result  # noqa: E402
from training_speed import Clock, counts  # noqa: E402


def module(genes: list[str], classes: list[str]) -> PretrainModule:
    torch.manual_seed(0)
    allowed = negatives_from_relations(classes, lambda a, b: False).tolist()
    return PretrainModule(EncoderConfig(len(genes)).to_dict(), classes, allowed,
                          optimizer=lambda params: torch.optim.Adam(params, lr=5e-3))


def bare_loop(genes, X, y, classes, batch, steps) -> float:
    m = module(genes, classes).train()
    opt = torch.optim.Adam(m.parameters(), lr=5e-3)
    xs = [Preprocessing()(X[i * batch:(i + 1) * batch]) for i in range(4)]  # pre-built dense tensors
    ys = [torch.as_tensor(y[i * batch:(i + 1) * batch]) for i in range(4)]
    for i in range(steps + 2):
        if i == 2:
            t0 = time.perf_counter()
        loss = m.losses((xs[i % 4], ys[i % 4]))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - t0)


def ours(genes, h5ad, classes, batch, steps) -> float:
    dm = PretrainDataModule(files=[{"path": str(h5ad), "label_key": "cell_type"}], batch_size=batch,
                            cells_per_class=8, val_fraction=0.01, min_gene_overlap=1)
    dm.gene_order = genes
    dm.setup("fit")
    clock = Clock()
    trainer = L.Trainer(max_steps=steps + 2, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                        num_sanity_val_steps=0, callbacks=[clock])
    trainer.fit(module(genes, list(dm.labels.classes)), datamodule=dm)
    return clock.cells / clock.seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--density", type=float, default=0.03)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "pretraining_speed.json"))
    args = p.parse_args()
    genes = resolve_gene_order("scimilarity")
    n_cells = args.batch_size * (args.steps + 4) * 2
    X = counts(n_cells, len(genes), args.density, seed=0)
    y = np.random.default_rng(0).integers(0, 8, n_cells)
    classes = [f"type{i}" for i in range(8)]
    h5ad = Path(tempfile.mkdtemp(prefix="bench_pretrain_")) / "cells.h5ad"
    ad.AnnData(X=X, obs=pd.DataFrame({"cell_type": [classes[i] for i in y]}, index=[f"c{i}" for i in range(n_cells)]),
               var=pd.DataFrame(index=genes)).write_h5ad(h5ad)
    limit = bare_loop(genes, X, y, classes, args.batch_size, args.steps)
    mine = ours(genes, h5ad, classes, args.batch_size, args.steps)
    write_result({"benchmark": "pretraining_speed", "n_genes": len(genes), "batch_size": args.batch_size,
                  "density": args.density, "torch_threads": torch.get_num_threads(),
                  "bare_dense_loop_cells_per_s": round(limit, 1), "ours_cells_per_s": round(mine, 1),
                  "ours_over_bare": round(mine / limit, 3)}, args.out)


if __name__ == "__main__":
    main()
