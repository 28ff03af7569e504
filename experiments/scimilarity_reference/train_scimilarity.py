"""SCimilarity 0.4.1's own pretraining (``MetricLearningDataModule`` + ``MetricLearning``), unchanged, on the inputs
``prepare.py`` wrote. Runs in a venv with ``scimilarity==0.4.1`` and its dependencies (see README.md).

The known offline workarounds, and nothing else:
- its ontology loader downloads ``cl-basic.obo``: the default URL of ``import_cell_ontology`` is pointed at the
  local file prepare.py wrote;
- one study: ``remove_singleton_classes=False`` and ``sample_across_studies=False``;
- no validation file: ``limit_val_batches=0``.
``train.h5ad`` is already in the base's gene order, so no ``gene_order_file`` is passed (SCimilarity's alignment
refuses fewer than 5,000 overlapping genes, and the 748-gene demo order has 748).

    /work/scim-venv/bin/python experiments/scimilarity_reference/train_scimilarity.py \
        outputs/scimilarity_side_by_side/inputs --epochs 40 --out outputs/scimilarity_side_by_side/theirs
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("inputs", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--triplet-weight", type=float, default=0.001)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    import pytorch_lightning as pl
    import scimilarity.ontologies as ontologies

    ontologies.import_cell_ontology.__defaults__ = (str(args.inputs / "cl-basic.obo"),)
    from scimilarity.anndata_data_models import MetricLearningDataModule
    from scimilarity.training_models import MetricLearning

    pl.seed_everything(args.seed)
    datamodule = MetricLearningDataModule(
        train_path=str(args.inputs / "train.h5ad"), label_column="celltype_name", study_column="study",
        batch_size=args.batch_size, num_workers=1,
        remove_singleton_classes=False)
    model = MetricLearning(datamodule.n_genes, triplet_loss_weight=args.triplet_weight,
                           sample_across_studies=False, max_epochs=args.epochs)
    trainer = pl.Trainer(max_epochs=args.epochs, limit_val_batches=0, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False)
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    seconds = time.perf_counter() - start
    model.save_all(str(args.out / "model"))
    (args.out / "run.json").write_text(json.dumps({
        "n_cells": len(datamodule.train_dataset), "epochs": args.epochs, "batch_size": args.batch_size,
        "triplet_loss_weight": args.triplet_weight, "train_seconds": round(seconds, 1),
        "final": {k: float(v) for k, v in trainer.callback_metrics.items()}}, indent=2) + "\n")
    print(f"trained {args.epochs} epochs in {seconds:.0f} s -> {args.out / 'model'}")


if __name__ == "__main__":
    main()
