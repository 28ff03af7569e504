"""Annotate an ``.h5ad`` on disk (or a SOMA store's cells) in row chunks: a million-cell file is never loaded whole.

``annotate`` (AnnData in, AnnData out) needs the matrix in memory; a 1M-cell file of PBMC counts is about 2 GB
of CSR, and an AnnData of it twice that once copied. Here the matrix is read from HDF5 a chunk of rows at a time
(:mod:`scimilarity_lora.data.row_source`); each chunk goes through :func:`.annotate.annotate` itself (so both paths
give the same columns, byte for byte); the output is the input file copied on disk, then its ``obs``, ``obsm`` and
``uns`` rewritten in place: per-cell matrices (the embedding, the kNN neighbours) are written chunk by chunk into
HDF5 datasets, so no second copy of anything cell x feature is held. Peak memory is one chunk, the model, and
the ``obs`` table (with its new columns). Nothing is written at the output path until every chunk has succeeded.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scimilarity_lora.data.io import DataError
from scimilarity_lora.data.row_source import open_h5ad_rows, open_soma_rows
from scimilarity_lora.inference.annotate import annotate, check_vote_on
from scimilarity_lora.inference.calibration import STATUSES
from scimilarity_lora.inference.predictor import CellTypePredictor
from scimilarity_lora.preprocess import InvalidExpressionError

log = logging.getLogger(__name__)

#: cells per chunk read from the file (each is then run in ``batch_size`` batches)
CHUNK_CELLS = 65_536
#: at most this many per chunk from a SOMA store: a read goes through an Arrow table and index lookups, about four
#: times the chunk's CSR (a 1M-cell store peaked at 2,121 MB with 65,536-cell chunks, the .h5ad at 1,669 MB)
SOMA_CHUNK_CELLS = 16_384


def annotate_file(input_path: str | Path, output_path: str | Path, model: str | Path | CellTypePredictor, *,
                  layer: str | None = None, gene_symbols_key: str | None = None, chunk_cells: int = CHUNK_CELLS,
                  progress: bool = False, majority_voting: bool = False, over_clustering: str | None = None,
                  vote_on: str = "embedding", seed: int = 0, key_added: str = "scimilarity_lora",
                  obs_filter: str | None = None,
                  **options: Any) -> dict[str, Any]:
    """Write ``output_path``: the input file with the columns :func:`.annotate.annotate` adds (same keyword
    options), computed ``chunk_cells`` rows at a time. Returns the ``uns[key_added]`` summary.

    ``input_path`` may also be a Census-shaped SOMA store (a directory; ``obs_filter`` selects the cells, as for
    the reference index): the output then holds those cells' obs, the store's genes as var and the results, with
    no matrix (the counts stay in the store)."""
    check_vote_on(vote_on)
    predictor = model if isinstance(model, CellTypePredictor) else CellTypePredictor.load(model)
    if options.get("reference") is not None:  # opened (and checked) once, before any cell is embedded
        from scimilarity_lora.inference.reference.query import open_reference

        options["reference"] = open_reference(options["reference"])
    store = Path(input_path).is_dir()
    source = (open_soma_rows(str(input_path), obs_filter=obs_filter) if store else
              open_h5ad_rows(Path(input_path), layer=layer, gene_symbols_key=gene_symbols_key,
                             gene_ids_key=options.get("gene_ids_key")))
    output_path = Path(output_path)
    tmp = output_path.with_name(f".{output_path.name}.partial")
    try:
        with source:
            if over_clustering is not None and over_clustering not in source.obs.columns:
                raise DataError(f"over-clustering column {over_clustering!r} not in obs; columns: "
                                f"{list(source.obs.columns)}")
            if store:  # the counts stay in the store: the output holds the cells, the genes and the results
                ad.AnnData(obs=source.obs, var=pd.DataFrame(index=pd.Index(source.genes, dtype=str))).write_h5ad(tmp)
            else:
                shutil.copyfile(input_path, tmp)
            ids = None
            if options.get("gene_ids_key"):  # the chunks' var carries the source's ids under a fixed name
                ids, options = source.gene_ids, {**options, "gene_ids_key": "gene_ids"}
            chunk_cells = min(chunk_cells, SOMA_CHUNK_CELLS) if store else chunk_cells
            summary = _annotate_chunks(source, tmp, predictor, chunk_cells, progress, key_added, options, ids)
            clusters = None
            if majority_voting and over_clustering is None and vote_on == "expression":
                from scimilarity_lora.inference.majority import expression_clusters

                clusters = expression_clusters(sp.vstack([X for _, X in source.chunks(chunk_cells)], format="csr"),
                                               bool(options.get("input_is_log1p")), seed=seed)
        if majority_voting:
            _majority_voting(tmp, over_clustering, key_added, seed, clusters)
        os.replace(tmp, output_path)
    finally:
        tmp.unlink(missing_ok=True)
    return summary


def _annotate_chunks(source, out: Path, predictor: CellTypePredictor, chunk_cells: int, progress: bool,
                     key_added: str, options: dict[str, Any], gene_ids: list[str] | None) -> dict[str, Any]:
    import h5py
    from anndata.io import write_elem

    var = pd.DataFrame(index=pd.Index(source.genes, dtype=str))
    if gene_ids is not None:
        var["gene_ids"] = gene_ids
    new_obs: list[pd.DataFrame] = []
    uns: dict[str, Any] | None = None
    chunks = source.chunks(chunk_cells)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, total=-(-source.n_obs // chunk_cells), desc="annotating", unit="chunk")
    with h5py.File(out, "r+") as f:
        obsm = f.require_group("obsm")
        for rows, X in chunks:
            chunk = ad.AnnData(X=X, obs=pd.DataFrame(index=source.obs.index[rows]), var=var)
            try:
                annotate(chunk, predictor, key_added=key_added, progress=False, majority_voting=False, **options)
            except InvalidExpressionError as e:  # say where in the file: the error came from one chunk
                raise InvalidExpressionError(f"{source.description}, cells {rows.start:,} to {rows.stop - 1:,}: "
                                             f"{e}") from None
            new_obs.append(chunk.obs)
            for key, value in chunk.obsm.items():
                _write_rows(obsm, key, value, rows, source.n_obs)
            uns = uns or chunk.uns[key_added]  # per-cell counts in it are recomputed over all chunks below
        columns = pd.concat(new_obs) if new_obs else pd.DataFrame(index=source.obs.index)
        for c in columns.columns:  # per-chunk categories differ (e.g. which CL ids occur): one set for the file
            if isinstance(new_obs[0][c].dtype, pd.CategoricalDtype):
                first = list(new_obs[0][c].cat.categories)
                seen = pd.unique(columns[c].dropna())
                columns[c] = pd.Categorical(columns[c], categories=list(dict.fromkeys([*first, *seen])))
        obs = source.obs.copy()
        for c in columns.columns:
            obs[c] = columns[c].to_numpy() if not isinstance(columns[c].dtype, pd.CategoricalDtype) else columns[c].values
        uns = dict(uns or {})
        status = obs[f"{key_added}_status"].astype(str)
        uns["status_counts"] = {s: int((status == s).sum()) for s in STATUSES}
        uns["n_cells_without_expression"] = int((status == "no_expression").sum())
        if "reference" in uns:
            knn_status = obs[f"{key_added}_knn_status"].astype(str)
            uns["reference"] = {**uns["reference"], "status_counts": {
                s: int((knn_status == s).sum()) for s in ("ok", "novel", "no_expression")}}
        del f["obs"]
        write_elem(f, "obs", obs)
        uns_group = f.require_group("uns")
        if key_added in uns_group:
            del uns_group[key_added]
        write_elem(uns_group, key_added, uns)
    if uns["n_cells_without_expression"]:
        log.warning("%d of %d cells have no expression in the model's genes: their label is left empty",
                    uns["n_cells_without_expression"], source.n_obs)
    return uns


def _write_rows(group, key: str, value: "np.ndarray | pd.DataFrame", rows: slice, n_obs: int) -> None:
    """Write one chunk's rows of an ``obsm`` entry into the output file, creating it (in anndata's encoding) on the
    first chunk: arrays as one HDF5 dataset, string tables (the kNN neighbour ids) as one dataset per column."""
    import h5py

    if isinstance(value, pd.DataFrame):
        if rows.start == 0:
            if key in group:
                del group[key]
            frame = group.create_group(key)
            frame.attrs.update({"encoding-type": "dataframe", "encoding-version": "0.2.0", "_index": "_index",
                                "column-order": np.array(list(value.columns), dtype=object)})
            strings = h5py.string_dtype("utf-8")
            frame.create_dataset("_index", shape=(n_obs,), dtype=strings)
            for c in value.columns:
                frame.create_dataset(c, shape=(n_obs,), dtype=strings)
            for name in ("_index", *value.columns):
                frame[name].attrs.update({"encoding-type": "string-array", "encoding-version": "0.2.0"})
        frame = group[key]
        frame["_index"][rows] = value.index.astype(str).to_numpy(dtype=object)
        for c in value.columns:
            frame[c][rows] = value[c].astype(str).to_numpy(dtype=object)
        return
    value = np.asarray(value)
    if rows.start == 0:
        if key in group:
            del group[key]
        ds = group.create_dataset(key, shape=(n_obs, *value.shape[1:]), dtype=value.dtype)
        ds.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
    group[key][rows] = value


def _majority_voting(path: Path, over_clustering: str | None, key_added: str, seed: int,
                     clusters: np.ndarray | None = None) -> None:
    """CellTypist-style majority voting after all chunks: over ``clusters`` (of the cells' expression), the user's
    own clusters (only labels are read), or Leiden clusters of the embedding (which reads the cells x latent
    embedding back: 512 MB at 1M cells)."""
    import h5py
    from anndata.io import read_elem, write_elem

    from scimilarity_lora.inference.majority import majority_vote, over_cluster

    with h5py.File(path, "r+") as f:
        obs = read_elem(f["obs"])
        vote_on = over_clustering or ("expression" if clusters is not None else "embedding")
        if clusters is None:
            clusters = (obs[over_clustering].astype("string").to_numpy(dtype=object, na_value=None)
                        if over_clustering else over_cluster(np.asarray(f["obsm/X_scimilarity"][:]), seed=seed))
        majority, frequency = majority_vote(np.asarray(obs[f"{key_added}_label"], dtype=object), clusters)
        obs[f"{key_added}_over_clustering"] = pd.Categorical(clusters)
        obs[f"{key_added}_majority_voting"] = pd.Categorical(majority)
        obs[f"{key_added}_majority_frequency"] = frequency
        del f["obs"]
        write_elem(f, "obs", obs)
        uns = read_elem(f["uns"][key_added])
        uns["majority_voting"] = True
        uns["vote_on"] = vote_on
        del f["uns"][key_added]
        write_elem(f["uns"], key_added, uns)
