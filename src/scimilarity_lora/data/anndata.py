"""A LightningDataModule over an in-memory AnnData (an ``.h5ad`` file or scanpy's bundled PBMC data).

The expression matrix is aligned to the model's gene order once, as sparse CSR (no dense copy); each batch is
then normalised on the fly by :class:`~scimilarity_lora.preprocess.Preprocessing`.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Sequence

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from scimilarity_lora.data.base import CellDataModule
from scimilarity_lora.data.resumable import ResumableDataLoader, ResumableSampler
from scimilarity_lora.data.io import DataError, expression_matrix, gene_names, read_anndata, validate_matrix
from scimilarity_lora.genes import align_genes
from scimilarity_lora.labels import LabelError
from scimilarity_lora.data.augment import CountAugment
from scimilarity_lora.preprocess import InvalidExpressionError, Preprocessing, highly_variable_panel, marker_panel

log = logging.getLogger(__name__)

#: how ``data.gene_panel`` genes are chosen on the training cells (preprocess.py)
PANEL_METHODS = {"variable": "the most variable (scanpy's Seurat dispersion)",
                 "markers": "the markers of each pair of classes (SingleR's choice)"}


class CellBatchDataset(Dataset):
    """Rows of an aligned CSR matrix; ``__getitems__`` fetches and normalises a whole batch at once."""

    def __init__(self, X: sp.csr_matrix, y: np.ndarray, preprocessing: Preprocessing, input_format: str = "auto",
                 augment: CountAugment | None = None) -> None:
        self.X, self.y, self.preprocessing = X, torch.as_tensor(y, dtype=torch.long), preprocessing
        self.input_format = input_format
        #: training split only: counts thinned / genes dropped per batch (see .augment)
        self.augment = augment if augment is not None and augment.active else None

    def __len__(self) -> int:
        return self.X.shape[0]

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        X = self.X[idx] if self.augment is None else self.augment(sp.csr_matrix(self.X[idx]), idx)
        # validated once for the whole matrix in setup(); skip the per-batch check on the hot path
        return self.preprocessing(X, validate=False, output=self.input_format), self.y[idx]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([i])
        return (x.to_dense() if hasattr(x, "to_dense") else x)[0], y[0]


def collate_batch(batch: Any) -> Any:
    """The dataset already returns whole batches."""
    return batch


class AnnDataModule(CellDataModule):
    """Train/val/test splits of one AnnData, aligned to the model's gene order.

    Set :attr:`gene_order` (the model's genes) before :meth:`setup`; :meth:`data_genes` tells which genes the
    data has (used to build a stand-in encoder when no pretrained model is given).
    """

    def __init__(
        self,
        path: str = "pbmc68k_reduced",
        label_key: str = "bulk_labels",
        layer: str | None = "raw",
        input_is_log1p: bool = True,
        gene_symbols_key: str | None = None,
        gene_ids_key: str | None = None,
        donor_key: str | None = None,
        min_cells_per_class: int = 5,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        batch_size: int = 128,
        num_workers: int = 0,
        min_gene_overlap: int = 50,
        min_gene_overlap_fraction: float = 0.0,
        target_sum: float = 1e4,
        input_format: str = "auto",
        gene_aliases: bool = True,
        exclude_classes: list[str] | None = None,
        ontology_key: str | None = None,
        label_to_ontology: dict[str, str] | str | None = None,
        augment: dict | None = None,
        gene_panel: int | None = None,
        gene_panel_method: str = "variable",
        adata: ad.AnnData | None = None,
    ) -> None:
        super().__init__(label_key=label_key, donor_key=donor_key, min_cells_per_class=min_cells_per_class,
                         val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, batch_size=batch_size,
                         num_workers=num_workers, min_gene_overlap=min_gene_overlap,
                         min_gene_overlap_fraction=min_gene_overlap_fraction, target_sum=target_sum,
                         input_is_log1p=input_is_log1p, input_format=input_format, gene_aliases=gene_aliases,
                         exclude_classes=exclude_classes, ontology_key=ontology_key,
                         label_to_ontology=label_to_ontology)
        self.path, self.layer = path, layer
        self.gene_symbols_key, self.gene_ids_key = gene_symbols_key, gene_ids_key
        self.augment_config = dict(augment or {})  # checked in setup(), where errors are one line
        if gene_panel is not None and int(gene_panel) < 1:
            raise ValueError(f"data.gene_panel must be a number of genes (>= 1) or null, got {gene_panel!r}")
        #: keep only this many most variable genes of the training cells (None: every gene); see preprocess.py
        self.gene_panel = None if gene_panel is None else int(gene_panel)
        if gene_panel_method not in PANEL_METHODS:
            raise ValueError(f"data.gene_panel_method must be one of {sorted(PANEL_METHODS)}, "
                             f"got {gene_panel_method!r}")
        self.gene_panel_method = gene_panel_method
        self._adata: ad.AnnData | None = adata  # in memory (the notebook API), else read from path
        self.visibility: dict = {}

    # -- inputs ----------------------------------------------------------------------------------------------
    @property
    def adata(self) -> ad.AnnData:
        if self._adata is None:
            self._adata = read_anndata(self.path)
        return self._adata

    def data_genes(self) -> list[str]:
        _, var_names, var = expression_matrix(self.adata, self.layer)
        return gene_names(var_names, var, self.gene_symbols_key)

    # -- Lightning hooks -------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        gene_order = self._require_gene_order()
        augment = CountAugment(**{"seed": self.seed, **self.augment_config})
        augment = augment.for_input(self.preprocessing.input_is_log1p)
        adata = self.adata
        if self.label_key not in adata.obs.columns:
            raise LabelError(
                f"label column {self.label_key!r} not in obs; available columns: {list(adata.obs.columns)}"
            )
        if self.ontology_key is not None:
            if self.ontology_key not in adata.obs.columns:
                raise DataError(f"ontology column {self.ontology_key!r} not in obs; columns: {list(adata.obs.columns)}")
            from scimilarity_lora.data.ontology import observed_terms

            self.observed_terms = observed_terms(adata.obs[self.label_key].astype("string"),
                                                 adata.obs[self.ontology_key].astype("string"))
        if self.donor_key is not None and self.donor_key not in adata.obs.columns:
            raise DataError(f"donor column {self.donor_key!r} not in obs; columns: {list(adata.obs.columns)}")
        X, var_names, var = expression_matrix(adata, self.layer)
        where = f"{self.path} ({'X' if self.layer in (None, 'X') else self.layer})"
        validate_matrix(X, self.preprocessing, where)

        ids = None
        if self.gene_ids_key is not None:
            if self.gene_ids_key not in var.columns:
                raise DataError(f"gene id column {self.gene_ids_key!r} not in var; columns: {list(var.columns)}")
            ids = var[self.gene_ids_key].astype(str).tolist()
        self.alignment = align_genes(
            gene_names(var_names, var, self.gene_symbols_key), gene_order, data_gene_ids=ids,
            min_overlap=self.min_gene_overlap, min_overlap_fraction=self.min_gene_overlap_fraction,
            aliases=self.aliases(),
        )
        self.visibility = self.alignment.visibility(X, self.preprocessing.input_is_log1p)
        self._report_visibility(gene_names(var_names, var, self.gene_symbols_key), ids)
        groups = adata.obs[self.donor_key].astype(str).to_numpy() if self.donor_key is not None else None
        aligned = self.alignment.apply(X)
        rows, y = self.encode_and_split(adata.obs[self.label_key].to_numpy(dtype=object), groups,
                                        adata.obs_names.to_numpy(), expressed=self.preprocessing.nonempty_rows(aligned))
        aligned = aligned[rows]
        if self.gene_panel is not None:  # chosen on the training cells only: validation and test stay unseen
            train = self.splits.train
            if self.gene_panel_method == "markers":
                panel = marker_panel(aligned[train], y[train], self.preprocessing, self.gene_panel)
            else:
                panel = highly_variable_panel(aligned[train], self.preprocessing, self.gene_panel)
            self.preprocessing = replace(self.preprocessing, gene_panel=panel)
            log.info("gene panel: %d of the training cells' genes, %s (data.gene_panel=%d)", len(panel),
                     PANEL_METHODS[self.gene_panel_method], self.gene_panel)
        for name, part in self.splits.as_dict().items():
            self.datasets[name] = CellBatchDataset(aligned[part], y[part], self.preprocessing, self.input_format,
                                                   augment=augment if name == "train" else None)

    def _report_visibility(self, genes: list[str], ids: list[str] | None) -> None:
        """Log what share of the file the base sees; loudly when it is under half of the counts, with what
        SCimilarity's full gene order would see instead (the better choice, named)."""
        v = self.visibility
        msg = (f"the base sees {v['n_expressed_genes_seen']:,} of the {v['n_expressed_data_genes']:,} genes this file "
               f"expresses ({v['expressed_gene_fraction_seen']:.1%}), carrying {v['count_fraction_seen']:.1%} of its counts")
        if v["count_fraction_seen"] >= 0.5 or len(self.gene_order) >= 20_000:
            log.info(msg)
            return
        from scimilarity_lora.genes import scimilarity_gene_order

        full = align_genes(genes, scimilarity_gene_order(), data_gene_ids=ids, min_overlap=0, aliases=self.aliases())
        fv = full.visibility(self.adata_matrix(), self.preprocessing.input_is_log1p)
        log.warning("%s. A base over SCimilarity's full gene order would see %.1f%% of its counts: "
                    "model=scimilarity_full, or model.pretrained_dir=/path/to/model_v1.1 for the real weights",
                    msg, 100 * fv["count_fraction_seen"])

    def adata_matrix(self) -> sp.spmatrix | np.ndarray:
        return expression_matrix(self.adata, self.layer)[0]

    def summary(self) -> dict:
        return {**super().summary(), "gene_visibility": self.visibility}

    def seen_genes(self) -> np.ndarray:
        """Model genes with a non-zero value in at least one training cell (exact: the split is in memory), within
        the gene panel if there is one (the model sees no other gene)."""
        X = self.datasets["train"].X
        seen = np.bincount(X.indices[X.data != 0], minlength=X.shape[1]) > 0
        panel = self.preprocessing.panel_mask(X.shape[1])
        return seen if panel is None else seen & panel

    def _loader(self, split: str, shuffle: bool, rows: np.ndarray | None = None) -> DataLoader:
        dataset = self.datasets[split] if rows is None else Subset(self.datasets[split], rows.tolist())
        return ResumableDataLoader(
            dataset, batch_size=self.batch_size, sampler=ResumableSampler(dataset, shuffle=shuffle, seed=self.seed),
            num_workers=self.num_workers, collate_fn=collate_batch, persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def eval_dataloader(self, split: str, rows: np.ndarray | None = None) -> DataLoader:
        """Any split in its stored order (no shuffle): what evaluation iterates; ``rows``: only these positions of
        the split (sorted), e.g. a sample from :func:`~.splits.uniform_sample`."""
        return self._loader(split, shuffle=False, rows=rows)


__all__ = ["AnnDataModule", "DataError", "InvalidExpressionError", "read_anndata"]
