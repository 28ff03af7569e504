"""A LightningDataModule that streams train/val/test splits out of the CELLxGENE Census with tiledbsoma-ml.

Only ``obs`` metadata of the slice (join id, label, donor) is read up front, to split by donor and fix the label
encoding; expression is streamed in IO batches and normalised per mini-batch with the same
:mod:`~scimilarity_lora.genes` alignment and :mod:`~scimilarity_lora.preprocess` code as every other path. ``var``
is restricted to the model's genes, so only needed columns are read.

``uri`` opens a local or mirrored copy fully offline (``cellxgene_census.open_soma(uri=...)``); without it,
``census_version`` is opened from the Census servers.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch
from attrs import evolve
from tiledbsoma_ml import ExperimentDataset, experiment_dataloader
from tiledbsoma_ml._distributed import init_multiprocessing

from scimilarity_lora.data.anndata import DataError
from scimilarity_lora.data.base import CellDataModule
from scimilarity_lora.data.resumable import ResumableDataLoader
from scimilarity_lora.genes import GeneAlignment, align_genes
from scimilarity_lora.labels import LabelError
from scimilarity_lora.preprocess import Preprocessing

log = logging.getLogger(__name__)

#: Healthy-donor blood, primary data only (no duplicate cells across datasets), dissociated cells.
DEFAULT_FILTER = ("tissue_general == 'blood' and disease == 'normal' and is_primary_data == True "
                  "and suspension_type == 'cell'")


class EpochShuffledExperimentDataset(ExperimentDataset):
    """tiledbsoma-ml 0.1.0 shuffles with ``seed`` alone, so every epoch had the same order; fold the epoch in.

    The shuffle stays identical on every DDP rank and worker for a given (seed, epoch), which keeps the rank
    partitions disjoint. :class:`~scimilarity_lora.training.callbacks.SetDatasetEpoch` sets the epoch from the
    trainer before each epoch's iterator is created (so it also holds with DataLoader workers and partial epochs).
    It also resumes: ``state_dict`` is (epoch, mini-batches handed out), and after ``load_state_dict`` the next
    iteration of that epoch skips the batches the checkpointed run had already trained on (same order: exact).
    """

    def __iter__(self) -> Iterator[Any]:
        epoch = self.epoch
        resume = self.__dict__.pop("_resume", None)
        skip = int(resume["consumed"]) if resume is not None and int(resume["epoch"]) == epoch else 0
        self.__dict__["consumed"] = 0
        for i, batch in enumerate(ExperimentDataset.__iter__(evolve(self, seed=int(self.seed) + epoch))):
            if i < skip:
                continue
            self.__dict__["consumed"] = i + 1
            yield batch
        self.epoch = epoch + 1

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.epoch), "consumed": int(self.__dict__.get("consumed", 0))}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.__dict__["_resume"] = {"epoch": int(state["epoch"]), "consumed": int(state["consumed"])}


class CensusBatch:
    """Collate for tiledbsoma-ml mini-batches: (CSR counts, obs) -> (encoder input, label ids). Picklable."""

    def __init__(self, alignment: GeneAlignment, preprocessing: Preprocessing, label_key: str, classes: list[str],
                 input_format: str = "auto"):
        self.alignment, self.preprocessing, self.label_key = alignment, preprocessing, label_key
        self.classes, self.input_format = classes, input_format

    def __call__(self, batch: tuple[Any, pd.DataFrame]) -> tuple[torch.Tensor, torch.Tensor]:
        X, obs = batch
        aligned = self.alignment.apply(X)
        expressed = self.preprocessing.nonempty_rows(aligned)
        if not expressed.all():  # the store is never read whole: cells with nothing to learn from go per batch
            log.warning("skipping %d cells with no expression in the model's genes (soma_joinid %s)",
                        int((~expressed).sum()), obs["soma_joinid"].to_numpy()[~expressed][:5].tolist())
            aligned, obs = aligned[expressed], obs[expressed]
        # validates each batch: the store is never read whole
        x = self.preprocessing(aligned, output=self.input_format)
        codes = pd.Categorical(obs[self.label_key].astype(str), categories=self.classes).codes
        return x, torch.from_numpy(np.array(codes, dtype=np.int64))


def open_census(uri: str | None, census_version: str | None, tiledb_config: dict | None = None):
    """The Census (or a local / mirrored SOMA store at ``uri``, opened offline), with an error that says what to
    do when the Census servers cannot be reached."""
    import cellxgene_census

    if uri:
        if "://" not in uri and not Path(uri).exists():
            raise DataError(f"no SOMA store at {uri}")
        return cellxgene_census.open_soma(uri=uri, tiledb_config=tiledb_config)
    import requests

    try:
        return cellxgene_census.open_soma(census_version=census_version, tiledb_config=tiledb_config)
    except requests.exceptions.RequestException as e:
        raise DataError(
            f"the CELLxGENE Census servers could not be reached ({type(e).__name__}); point data.uri at a local "
            "or mirrored copy of the Census (a SOMA store: copy the release with `aws s3 sync` or tiledbsoma, or "
            "build a Census-shaped store from your own .h5ad with `python -m scimilarity_lora.data.soma_store`) "
            "and run again with data.uri=/path/to/soma") from None


class CensusDataModule(CellDataModule):
    id_column = "soma_joinid"

    def __init__(
        self,
        uri: str | None = None,
        census_version: str = "2025-11-08",
        organism: str = "homo_sapiens",
        measurement: str = "RNA",
        X_layer: str = "raw",
        obs_value_filter: str = DEFAULT_FILTER,
        dataset_id: str | None = None,
        label_key: str = "cell_type",
        donor_key: str = "donor_id",
        min_cells_per_class: int = 10,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        batch_size: int = 128,
        io_batch_size: int = 16384,
        eval_io_batch_size: int = 4096,
        shuffle_chunk_size: int = 64,
        num_workers: int = 0,
        use_eager_fetch: bool = True,
        tiledb_config: dict | None = None,
        min_gene_overlap: int = 50,
        min_gene_overlap_fraction: float = 0.0,
        target_sum: float = 1e4,
        input_format: str = "auto",
        gene_aliases: bool = True,
        exclude_classes: list[str] | None = None,
        ontology_key: str | None = "cell_type_ontology_term_id",
        label_to_ontology: dict[str, str] | str | None = None,
    ) -> None:
        super().__init__(label_key=label_key, donor_key=donor_key, min_cells_per_class=min_cells_per_class,
                         val_fraction=val_fraction, test_fraction=test_fraction, seed=seed, batch_size=batch_size,
                         num_workers=num_workers, min_gene_overlap=min_gene_overlap,
                         min_gene_overlap_fraction=min_gene_overlap_fraction, target_sum=target_sum,
                         input_is_log1p=False, input_format=input_format,
                         gene_aliases=gene_aliases,
                         exclude_classes=exclude_classes, ontology_key=ontology_key,
                         label_to_ontology=label_to_ontology)  # Census X['raw'] holds counts
        if io_batch_size % shuffle_chunk_size:
            raise ValueError(f"data.io_batch_size ({io_batch_size}) must be a multiple of "
                             f"data.shuffle_chunk_size ({shuffle_chunk_size})")
        self.uri, self.census_version, self.organism = uri, census_version, organism
        self.measurement, self.X_layer = measurement, X_layer
        self.obs_value_filter = obs_value_filter
        if dataset_id:
            self.obs_value_filter = f"({obs_value_filter}) and dataset_id == '{dataset_id}'"
        if eval_io_batch_size < 1:
            raise ValueError(f"data.eval_io_batch_size must be positive, got {eval_io_batch_size}")
        self.io_batch_size, self.shuffle_chunk_size = io_batch_size, shuffle_chunk_size
        self.eval_io_batch_size = eval_io_batch_size
        self.use_eager_fetch = use_eager_fetch
        self.tiledb_config = dict(tiledb_config) if tiledb_config else None
        self.split_joinids: dict[str, np.ndarray] = {}

    # -- opening -------------------------------------------------------------------------------------------------
    def open(self):
        return open_census(self.uri, self.census_version, self.tiledb_config)

    def _var(self, exp) -> pd.DataFrame:
        var = exp.ms[self.measurement].var.read(column_names=["soma_joinid", "feature_id", "feature_name"])
        return var.concat().to_pandas().sort_values("soma_joinid").reset_index(drop=True)

    def data_genes(self) -> list[str]:
        with self.open() as census:
            return self._var(census["census_data"][self.organism])["feature_name"].astype(str).tolist()

    # -- setup ---------------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Build datasets here (not in __init__): tiledbsoma-ml shards by DDP rank when a dataset is built."""
        if self.datasets:
            return
        self._require_gene_order()
        import tiledbsoma as soma

        with self.open() as census:
            exp = census["census_data"][self.organism]
            var = self._var(exp)
            model_genes = set(self.gene_order)
            aliases = self.aliases() or {}
            by_alias = var["feature_name"].map(lambda g: aliases.get(g) in model_genes)
            keep_var = var["feature_name"].isin(model_genes) | var["feature_id"].isin(model_genes) | by_alias
            var = var[keep_var].reset_index(drop=True)
            self.alignment = align_genes(
                var["feature_name"].astype(str).tolist(), self.gene_order,
                data_gene_ids=var["feature_id"].astype(str).tolist(),
                min_overlap=self.min_gene_overlap, min_overlap_fraction=self.min_gene_overlap_fraction,
                aliases=self.aliases(),
            )
            obs = self._obs(exp)
            self._split(obs)
            with exp.axis_query(
                self.measurement,
                obs_query=soma.AxisQuery(coords=(self.split_joinids["train"],)),
                var_query=soma.AxisQuery(coords=(var["soma_joinid"].to_numpy(),)),
            ) as query:
                base = EpochShuffledExperimentDataset(
                    query, layer_name=self.X_layer, obs_column_names=["soma_joinid", self.label_key],
                    batch_size=self.batch_size, io_batch_size=self.io_batch_size,
                    shuffle_chunk_size=self.shuffle_chunk_size, seed=self.seed, return_sparse_X=True,
                    use_eager_fetch=self.use_eager_fetch, shuffle=True,
                )
        for name, joinids in self.split_joinids.items():
            ids = evolve(base.query_ids, obs_joinids=joinids)
            self.datasets[name] = evolve(base, query_ids=ids, shuffle=name == "train")
        log.info("census slice %r: train/val/test = %s cells, %d classes, %d of %d model genes present",
                 self.obs_value_filter, [len(v) for v in self.split_joinids.values()], len(self.labels),
                 self.alignment.n_overlap, len(self.gene_order))

    def _obs_columns(self, names: set[str]) -> list[str]:
        """The obs columns read for the slice (``names``: those the store has)."""
        ontology = [self.ontology_key] if self.ontology_key in names and self.ontology_key != self.label_key else []
        return ["soma_joinid", self.label_key] + ([self.donor_key] if self.donor_key else []) + ontology

    def _obs(self, exp) -> pd.DataFrame:
        names = set(exp.obs.schema.names)
        columns = self._obs_columns(names)
        missing = [c for c in columns if c not in names]
        if missing:
            raise LabelError(f"obs columns {missing} not in the Census obs; available: {sorted(names)}")
        try:
            obs = exp.obs.read(value_filter=self.obs_value_filter, column_names=columns).concat().to_pandas()
        except Exception as e:  # tiledbsoma raises SOMAError/ValueError for malformed filters
            raise DataError(f"invalid data.obs_value_filter {self.obs_value_filter!r}: {e}") from e
        if obs.empty:
            raise DataError(f"no cells match data.obs_value_filter {self.obs_value_filter!r}")
        return obs.sort_values("soma_joinid").reset_index(drop=True)

    def _split(self, obs: pd.DataFrame) -> None:
        if self.ontology_key in obs.columns:  # read with the labels, in the same pass over obs
            from scimilarity_lora.data.ontology import observed_terms

            self.observed_terms = observed_terms(obs[self.label_key].astype("string"),
                                                 obs[self.ontology_key].astype("string"))
        groups = obs[self.donor_key].astype(str).to_numpy() if self.donor_key else None
        self.encode_and_split(obs[self.label_key].to_numpy(dtype=object), groups, obs["soma_joinid"].to_numpy())
        self.split_joinids = self.split_ids()

    # seen_genes(): the base class's (every gene the store's var provides); a gene present in var but zero in every
    # training cell counts as seen, since finding out would take a full pass over the stream before training.

    def summary(self) -> dict:
        return {**super().summary(),
                "census": {"uri": self.uri, "census_version": None if self.uri else self.census_version,
                           "obs_value_filter": self.obs_value_filter}}

    # -- loaders -------------------------------------------------------------------------------------------------
    def _loader(self, split: str, dataset: ExperimentDataset | None = None):
        collate = CensusBatch(self.alignment, self.preprocessing, self.label_key, list(self.labels.classes),
                              self.input_format)
        if split == "train" and dataset is None:  # the train position goes into checkpoints (exact resume)
            if self.num_workers > 0:
                init_multiprocessing()  # what experiment_dataloader does for workers: spawn, not fork
            return ResumableDataLoader(self.datasets[split], batch_size=None, shuffle=False,
                                       num_workers=self.num_workers, collate_fn=collate)
        return experiment_dataloader(dataset or self.datasets[split], num_workers=self.num_workers,
                                     collate_fn=collate)

    def eval_dataloader(self, split: str, rows: np.ndarray | None = None):
        """Any split without shuffling: what evaluation iterates; ``rows``: only these positions of the split (a
        sample is read, not the whole split). Reads ``eval_io_batch_size`` cells at a time: without shuffling a
        large read buys nothing, and each read in flight holds its Arrow tables, their CSR copies and TileDB's
        buffers."""
        dataset, io_batch_size = self.datasets[split], self.eval_io_batch_size
        if rows is not None:
            joinids = self.split_joinids[split]
            dataset = evolve(dataset, query_ids=evolve(dataset.query_ids, obs_joinids=joinids[rows]))
            # a read spans the tiles of every cell between its first and last: keep that span, not the count, at
            # eval_io_batch_size (4,096 cells of a 7% sample would span the tiles of some 57,000)
            io_batch_size = max(64, -(-io_batch_size * len(rows) // max(1, len(joinids))))
        return self._loader(split, evolve(dataset, shuffle=False, io_batch_size=io_batch_size))

    def train_dataloader(self):
        return self._loader("train")

    def val_dataloader(self):
        return self._loader("val")

    def test_dataloader(self):
        return self._loader("test")
