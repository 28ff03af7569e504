"""Full-size LoRA fine-tuning speed against the bare-PyTorch limit, sparse vs dense input, merged inference.
In one process, same batch size and threads, synthetic sparse counts at several densities. Prints one JSON line.

    python benchmarks/training_speed.py

1. limit: a bare loop (forward + backward + AdamW step) of the same LoRA model on pre-built dense tensors; beside
   it the same bare loop on pre-built sparse batches, and at 5% density a torch.profiler table of its steps;
2. ours: Lightning Trainer + AnnDataModule + preprocessing, timed from the 3rd batch to the end of fit (data
   loading and normalisation included), with input_format=dense and input_format=auto (sparse when sparse);
3. inference: merged vs unmerged LoRA encoder + head, eval mode, torch.inference_mode.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import lightning as L
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from scimilarity_lora.data.anndata import AnnDataModule
from scimilarity_lora.model.encoder import EncoderConfig
from scimilarity_lora.genes import resolve_gene_order
from scimilarity_lora.model.adapters import FinetuneConfig, merged_encoder
from scimilarity_lora.training.module import CellTypeClassifier
from scimilarity_lora.preprocess import Preprocessing

sys.path.insert(0, str(Path(__file__).parent))
from _common import write_result  # noqa: E402


def counts(n_cells: int, n_genes: int, density: float, seed: int) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    X = sp.random(n_cells, n_genes, density=density, format="csr", random_state=rng, dtype=np.float32)
    X.data = (rng.poisson(2.0, X.data.size) + 1).astype(np.float32)
    return X


def model(genes: list[str], n_classes: int) -> CellTypeClassifier:
    torch.manual_seed(0)
    return CellTypeClassifier(
        encoder_config=EncoderConfig(n_genes=len(genes)).to_dict(), gene_order=genes,
        classes=[f"type{i}" for i in range(n_classes)], finetune=FinetuneConfig(mode="lora", r=8).to_dict(),
        preprocessing={"target_sum": 1e4, "input_is_log1p": False},
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3), class_weights=None,
    )


def bare_loop(genes, X, y, batch, steps) -> float:
    m = model(genes, int(y.max()) + 1).train()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    xs = [Preprocessing()(X[i * batch:(i + 1) * batch]) for i in range(4)]  # pre-built dense tensors
    ys = [torch.as_tensor(y[i * batch:(i + 1) * batch]) for i in range(4)]
    for i in range(steps + 2):
        if i == 2:
            t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(m(xs[i % 4]), ys[i % 4])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - t0)


def bare_sparse_loop(genes, X, y, batch, steps, profile: bool = False) -> tuple[float, list[dict] | None]:
    """The same bare loop on pre-built sparse batches (the sparse first layer, no Lightning, no data loading), and
    optionally a torch.profiler table of its steps: where a sparse step's time goes, op by op (self CPU time)."""
    m = model(genes, int(y.max()) + 1).train()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    xs = [Preprocessing()(X[i * batch:(i + 1) * batch], output="sparse") for i in range(4)]
    ys = [torch.as_tensor(y[i * batch:(i + 1) * batch]) for i in range(4)]

    def step(i: int) -> None:
        loss = torch.nn.functional.cross_entropy(m(xs[i % 4]), ys[i % 4])
        opt.zero_grad()
        loss.backward()
        opt.step()

    for i in range(2):
        step(i)
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    speed = steps * batch / (time.perf_counter() - t0)
    if not profile:
        return speed, None
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for i in range(steps):
            step(i)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return speed, [{"op": e.key, "self_cpu_ms_per_step": round(e.self_cpu_time_total / 1e3 / steps, 2),
                    "share": round(e.self_cpu_time_total / total, 3), "calls_per_step": e.count / steps}
                   for e in events[:12]]


class Clock(L.Callback):
    def __init__(self, start_batch: int = 2):
        self.start_batch, self.t0, self.cells = start_batch, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.start_batch:
            self.t0 = time.perf_counter()
        if self.t0 is not None:
            self.cells += len(batch[1])

    def on_train_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.t0


def lightning_step(genes, h5ad, batch, steps, input_format) -> float:
    dm = AnnDataModule(path=str(h5ad), label_key="cell_type", layer="X", input_is_log1p=False,
                       batch_size=batch, min_cells_per_class=1, val_fraction=0.05, test_fraction=0.05,
                       input_format=input_format, min_gene_overlap=1)
    dm.gene_order = genes
    dm.setup("fit")
    m = model(genes, len(dm.labels))
    clock = Clock()
    trainer = L.Trainer(max_steps=steps + 2, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
                        num_sanity_val_steps=0, callbacks=[clock])
    trainer.fit(m, datamodule=dm)
    return clock.cells / clock.seconds


@torch.inference_mode()
def inference(encoder, head, x, repeats=8) -> float:
    encoder.eval(), head.eval()
    head(encoder(x))
    t0 = time.perf_counter()
    for _ in range(repeats):
        head(encoder(x))
    return repeats * (len(x) if not hasattr(x, "offsets") else len(x)) / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gene-order", default="scimilarity", help="\"scimilarity\" (the packaged order) or a gene_order.tsv")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--densities", default="0.03,0.05,0.10")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "training_speed.json"))
    args = p.parse_args()
    genes = resolve_gene_order(args.gene_order)
    work = Path(tempfile.mkdtemp(prefix="bench_speed_"))
    n_cells = args.batch_size * (args.steps + 4) * 1.12  # train split gets ~90%
    rows = []
    for density in map(float, args.densities.split(",")):
        X = counts(int(n_cells), len(genes), density, seed=0)
        y = np.random.default_rng(0).integers(0, 10, X.shape[0])
        h5ad = work / f"d{density}.h5ad"
        ad.AnnData(X=X, obs=pd.DataFrame({"cell_type": [f"type{i}" for i in y]}, index=[f"c{i}" for i in range(len(y))]),
                   var=pd.DataFrame(index=genes)).write_h5ad(h5ad)
        limit = bare_loop(genes, X, y, args.batch_size, args.steps)
        sparse_limit, ops = bare_sparse_loop(genes, X, y, args.batch_size, args.steps, profile=density == 0.05)
        ours_dense = lightning_step(genes, h5ad, args.batch_size, args.steps, "dense")
        ours_auto = lightning_step(genes, h5ad, args.batch_size, args.steps, "auto")
        rows.append({"density": density, "bare_dense_limit_cells_per_s": round(limit, 1),
                     "bare_sparse_loop_cells_per_s": round(sparse_limit, 1),
                     "ours_dense_cells_per_s": round(ours_dense, 1), "ours_auto_cells_per_s": round(ours_auto, 1),
                     "ratio_bare_sparse_to_limit": round(sparse_limit / limit, 3),
                     "ratio_ours_dense_to_limit": round(ours_dense / limit, 3),
                     "ratio_ours_auto_to_limit": round(ours_auto / limit, 3),
                     **({"sparse_step_profile": ops} if ops else {})})
        print(json.dumps(rows[-1]), file=sys.stderr)

    m = model(genes, 10)
    X = counts(args.batch_size * 4, len(genes), 0.05, seed=1)
    x = Preprocessing()(X)
    unmerged = inference(m.encoder, m.head, x)
    merged = inference(merged_encoder(m.encoder), m.head, x)
    merged_sparse = inference(merged_encoder(m.encoder), m.head, Preprocessing()(X, output="sparse"))
    result = {
        "benchmark": "training_speed", "n_genes": len(genes), "batch_size": args.batch_size,
        "torch_threads": torch.get_num_threads(), "lora": {"r": 8, "targets": "all"}, "training": rows,
        "inference_5pct": {"unmerged_cells_per_s": round(unmerged), "merged_cells_per_s": round(merged),
                           "merged_sparse_cells_per_s": round(merged_sparse),
                           "merged_over_unmerged": round(merged / unmerged, 3)},
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    write_result(result, args.out)


if __name__ == "__main__":
    main()
