"""Cells for pretraining: one or several ``.h5ad`` files, labelled or not, aligned to the base's gene order.

Unlike fine-tuning, nothing is dropped for lacking a label: unlabelled cells (label -1) train the reconstruction
term, labelled ones the triplet term too. A stratified ``holdout`` of one labelled file never enters pretraining (a
retention set, recorded in ``holdout.csv``), and every training batch holds several cells of each labelled type
(:class:`ClassBalancedBatchSampler`), so the triplet miner always finds positives.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import lightning as L
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler

from scimilarity_lora.data.anndata import CellBatchDataset, collate_batch
from scimilarity_lora.data.ontology import observed_terms, read_label_map
from scimilarity_lora.data.io import DataError, expression_matrix, gene_names, read_anndata, validate_matrix
from scimilarity_lora.data.resumable import EpochPosition, ResumableDataLoader
from scimilarity_lora.genes import align_genes, symbol_aliases
from scimilarity_lora.labels import LabelEncoder
from scimilarity_lora.preprocess import Preprocessing

log = logging.getLogger(__name__)


@dataclass
class SourceFile:
    """One input: ``path`` (an .h5ad or a bundled dataset name), or a CELLxGENE Census slice: ``uri`` (a local or
    mirrored SOMA store, offline) or ``census_version`` (the Census servers), with ``obs_value_filter``. A Census
    slice is read into memory with ``cellxgene_census.get_anndata`` (raw counts; symbols from ``feature_name``), so
    it must fit in memory; the labels are ``cell_type`` with ``cell_type_ontology_term_id`` as their CL ids."""

    path: str | None = None
    layer: str | None = "X"
    input_is_log1p: bool = False
    label_key: str | None = None
    ontology_key: str | None = None  # obs column of CL ids for the labels (e.g. cell_type_ontology_term_id)
    name: str = field(default="")
    uri: str | None = None
    census_version: str | None = None
    organism: str = "homo_sapiens"
    obs_value_filter: str | None = None

    @property
    def is_census(self) -> bool:
        return bool(self.uri or self.census_version)

    @property
    def where(self) -> str:
        return str(self.path) if not self.is_census else f"census {self.uri or self.census_version}"


class ClassBalancedBatchSampler(EpochPosition, Sampler[list[int]]):
    """Batches of ``batch_size`` distinct cells with ``per_class`` cells of every labelled type (cycling through a
    type's cells, all of them for a type with fewer) and the rest drawn from all cells, labelled or not; the order is
    a function of (seed, epoch).

    Under DDP every rank builds the same epoch and takes every ``world_size``-th batch (the epoch is padded to a
    multiple of ``world_size`` batches, so ranks step together). Its position (epoch, batches handed out) is saved
    in Lightning checkpoints through :class:`ResumableDataLoader`: a run resumed mid-epoch continues with the next
    batch of the same epoch."""

    def __init__(self, labels: np.ndarray, batch_size: int, per_class: int, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None) -> None:
        self.labels, self.batch_size, self.per_class, self.seed = np.asarray(labels), batch_size, per_class, seed
        self.classes = [c for c in np.unique(self.labels) if c >= 0 and (self.labels == c).sum() >= 2]
        if per_class * len(self.classes) > batch_size:
            raise ValueError(f"data.batch_size={batch_size} cannot hold {per_class} cells of each of "
                             f"{len(self.classes)} labelled types; raise it or lower data.cells_per_class")
        if world_size is None:
            distributed = dist.is_available() and dist.is_initialized()
            world_size, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
        self.rank, self.world_size = int(rank or 0), int(world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Batches per rank and epoch."""
        return int(np.ceil(max(1, int(np.ceil(len(self.labels) / self.batch_size))) / self.world_size))

    def _epoch_length(self) -> int:
        return len(self)

    def __iter__(self) -> Iterator[list[int]]:
        return self._resume_from(self._epoch_batches(len(self) * self.world_size)[self.rank::self.world_size])

    def _epoch_batches(self, n_batches: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        pools = {c: rng.permutation(np.flatnonzero(self.labels == c)) for c in self.classes}
        cursor = {c: 0 for c in self.classes}
        rest = rng.permutation(len(self.labels))
        r = 0
        out = []
        for _ in range(n_batches):
            batch: list[int] = []
            for c in self.classes:  # per_class cells of each type (all of a type that has fewer), no repeats
                pool, k = pools[c], min(self.per_class, len(pools[c]))
                batch.extend(int(pool[(cursor[c] + j) % len(pool)]) for j in range(k))
                cursor[c] += k
            chosen = set(batch)
            while len(batch) < self.batch_size and len(chosen) < len(self.labels):
                i = int(rest[r % len(rest)])
                r += 1
                if i not in chosen:
                    chosen.add(i)
                    batch.append(i)
            out.append(batch)
        return out


def _source_name(entry: dict[str, Any]) -> str:
    if entry.get("path"):
        return Path(str(entry["path"])).stem
    return "census" if not entry.get("uri") else f"census_{Path(str(entry['uri'])).name}"


def read_census_slice(source: SourceFile):
    """The cells of a Census (or local SOMA store) matching ``obs_value_filter``, raw counts, in memory."""
    import cellxgene_census

    from scimilarity_lora.data.census import open_census

    with open_census(source.uri, source.census_version) as census:
        adata = cellxgene_census.get_anndata(census, organism=source.organism, measurement_name="RNA", X_name="raw",
                                             obs_value_filter=source.obs_value_filter)
    if adata.n_obs == 0:
        raise DataError(f"{source.where}: no cells match obs_value_filter={source.obs_value_filter!r}")
    adata.obs_names = adata.obs["soma_joinid"].astype(str).to_numpy() if "soma_joinid" in adata.obs else adata.obs_names
    return adata


def sha256_of(path: str | Path) -> str | None:
    path = Path(path)
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class PretrainDataModule(L.LightningDataModule):
    def __init__(self, files: list[dict[str, Any]], holdout_file: str | None = None, holdout_fraction: float = 0.2,
                 val_fraction: float = 0.05, batch_size: int = 512, cells_per_class: int = 8, seed: int = 0,
                 num_workers: int = 0, min_gene_overlap: int = 50, target_sum: float = 1e4,
                 gene_aliases: bool = True, input_format: str = "auto",
                 label_to_ontology: dict[str, str] | str | None = None, holdout_seed: int | None = None) -> None:
        super().__init__()
        self.files = [SourceFile(**{**f, "name": f.get("name") or _source_name(f)}) for f in files]
        if not self.files:
            raise DataError("data.files is empty: give at least one .h5ad or Census slice")
        for f in self.files:
            if bool(f.path) == f.is_census:
                raise DataError(f"data.files entry {f.name!r}: give either path (an .h5ad) or uri/census_version "
                                "(a Census slice), not both or neither")
        self.holdout_file, self.holdout_fraction = holdout_file, holdout_fraction
        self.holdout_seed = seed if holdout_seed is None else holdout_seed  # fixed: one retention set for all seeds
        self.val_fraction, self.batch_size, self.cells_per_class = val_fraction, batch_size, cells_per_class
        self.seed, self.num_workers, self.min_gene_overlap = seed, num_workers, min_gene_overlap
        self.preprocessing = Preprocessing(target_sum=target_sum)
        self.gene_aliases, self.input_format = gene_aliases, input_format
        self.label_to_ontology = read_label_map(label_to_ontology)
        self.gene_order: list[str] | None = None
        self.labels: LabelEncoder | None = None
        self.observed_terms: dict[str, str] = {}
        self.datasets: dict[str, CellBatchDataset] = {}
        self.holdout: pd.DataFrame | None = None
        self.summary_: dict[str, Any] = {}
        self._train_labels: np.ndarray | None = None

    # -- building -----------------------------------------------------------------------------------------------
    def _read(self, source: SourceFile) -> tuple[sp.csr_matrix, pd.DataFrame, dict]:
        adata = read_census_slice(source) if source.is_census else read_anndata(source.path)
        X, var_names, var = expression_matrix(adata, "X" if source.is_census else source.layer)
        prep = Preprocessing(target_sum=self.preprocessing.target_sum, input_is_log1p=source.input_is_log1p)
        validate_matrix(X, prep, f"{source.where} ({source.layer})")
        symbols = gene_names(var_names, var, "feature_name" if source.is_census else None)
        alignment = align_genes(symbols, self.gene_order, min_overlap=self.min_gene_overlap,
                                aliases=symbol_aliases() if self.gene_aliases else None)
        aligned = alignment.apply(X)
        if source.input_is_log1p:  # back to per-cell-scaled counts: one preprocessing for every file
            aligned.data = np.expm1(aligned.data)
        obs = pd.DataFrame({"cell_id": adata.obs_names.astype(str), "file": source.name})
        if source.label_key:
            if source.label_key not in adata.obs.columns:
                raise DataError(f"{source.where}: label column {source.label_key!r} not in obs; "
                                f"available: {list(adata.obs.columns)}")
            obs["label"] = adata.obs[source.label_key].astype("string").to_numpy()
            if source.ontology_key and source.ontology_key in adata.obs.columns:
                self.observed_terms.update(observed_terms(obs["label"], adata.obs[source.ontology_key].astype(str)))
        else:
            obs["label"] = pd.array([pd.NA] * len(obs), dtype="string")
        identity = ({"census": source.uri or source.census_version, "obs_value_filter": source.obs_value_filter}
                    if source.is_census else {"path": str(source.path), "sha256": sha256_of(source.path)})
        return aligned.tocsr(), obs, {**identity, "n_cells": int(adata.n_obs), **alignment.summary()}

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        if self.gene_order is None:
            raise RuntimeError("PretrainDataModule.gene_order must be set to the base's genes before setup()")
        mats, frames, inputs = [], [], []
        for source in self.files:
            X, obs, info = self._read(source)
            mats.append(X)
            frames.append(obs)
            inputs.append(info)
        X = sp.vstack(mats).tocsr()
        obs = pd.concat(frames, ignore_index=True)
        expressed = self.preprocessing.nonempty_rows(X)
        keep = expressed.copy()
        if self.holdout_file:
            keep &= ~self._holdout_mask(obs)
        rng = np.random.default_rng(self.seed)
        labelled = obs["label"].notna().to_numpy()
        self.labels = LabelEncoder(sorted(set(obs.loc[keep & labelled, "label"].astype(str))))
        y = np.full(len(obs), -1, dtype=np.int64)
        y[keep & labelled] = self.labels.encode(obs.loc[keep & labelled, "label"].astype(str))
        rows = np.flatnonzero(keep)
        val = rng.random(len(rows)) < self.val_fraction
        train_rows, val_rows = rows[~val], rows[val]
        self.datasets = {"train": CellBatchDataset(X[train_rows], y[train_rows], self.preprocessing, self.input_format),
                         "val": CellBatchDataset(X[val_rows], y[val_rows], self.preprocessing, self.input_format)}
        self._train_labels = y[train_rows]
        self.summary_ = {"inputs": inputs, "n_cells": {"train": int(len(train_rows)), "val": int(len(val_rows)),
                                                       "holdout": int(0 if self.holdout is None else len(self.holdout)),
                                                       "without_expression": int((~expressed).sum())},
                         "n_labelled_train": int((y[train_rows] >= 0).sum()), "classes": list(self.labels.classes)}
        log.info("pretraining cells: %s; %d labelled types", self.summary_["n_cells"], len(self.labels))

    def _holdout_mask(self, obs: pd.DataFrame) -> np.ndarray:
        """A stratified ``holdout_fraction`` of the labelled cells of ``holdout_file`` (by file name or path)."""
        wanted = Path(str(self.holdout_file)).stem
        in_file = (obs["file"] == wanted).to_numpy() & obs["label"].notna().to_numpy()
        if not in_file.any():
            raise DataError(f"data.holdout_file={self.holdout_file!r} names no labelled input "
                            f"(inputs: {[f.name for f in self.files]})")
        rng = np.random.default_rng(self.holdout_seed)
        mask = np.zeros(len(obs), dtype=bool)
        for _, idx in obs[in_file].groupby("label").groups.items():
            idx = np.asarray(idx)
            mask[rng.choice(idx, int(round(self.holdout_fraction * len(idx))), replace=False)] = True
        self.holdout = obs.loc[mask, ["file", "cell_id", "label"]].reset_index(drop=True)
        return mask

    def class_terms(self) -> dict[str, str | None]:
        from scimilarity_lora.data.ontology import class_terms_from

        return class_terms_from(self.labels.classes, self.label_to_ontology, self.observed_terms)

    def summary(self) -> dict[str, Any]:
        return self.summary_

    # -- loaders ------------------------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        sampler = ClassBalancedBatchSampler(self._train_labels, self.batch_size, self.cells_per_class, self.seed)
        return ResumableDataLoader(self.datasets["train"], batch_sampler=sampler, num_workers=self.num_workers,
                                   collate_fn=collate_batch, generator=torch.Generator().manual_seed(self.seed))

    def val_dataloader(self) -> DataLoader:
        # its own generator: creating the iterator must not draw from the global RNG (dropout's), or a run resumed
        # from a save after an epoch's last batch would see other dropout masks than the uninterrupted run
        return DataLoader(self.datasets["val"], batch_size=self.batch_size, shuffle=False,
                          num_workers=self.num_workers, collate_fn=collate_batch,
                          generator=torch.Generator().manual_seed(self.seed))
