"""The gene panel (``data.gene_panel``): the model sees only the most variable genes of its training cells, chosen
on them, saved with the model and applied wherever it predicts."""

import json

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp

from helpers import FAST, compose_train
from scimilarity_lora.preprocess import EmptyCellError, Preprocessing, highly_variable_panel, marker_panel


def _counts(seed: int = 0, n_cells: int = 40, n_genes: int = 30) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    return sp.csr_matrix(rng.poisson(rng.gamma(0.5, 2.0, (n_cells, n_genes))).astype(np.float32))


def test_a_panel_keeps_its_genes_values_normalised_by_every_genes_depth():
    X = _counts()
    X[:, 0] = 3.0  # every cell expresses gene 0, inside the panel
    X = sp.csr_matrix(X)
    panel = (0, 2, 5, 7, 11)
    full = Preprocessing()(X).numpy()
    masked = Preprocessing(gene_panel=panel)(X).numpy()
    np.testing.assert_allclose(masked[:, panel], full[:, panel], rtol=1e-6)  # same depth: every gene's total
    outside = np.setdiff1d(np.arange(X.shape[1]), panel)
    assert not masked[:, outside].any() and full[:, outside].any()
    saved = json.loads(json.dumps(Preprocessing(gene_panel=panel).to_dict()))  # as model_config.json holds it
    assert Preprocessing.from_dict(saved).gene_panel == panel


def test_a_cell_with_nothing_in_the_panel_is_refused_not_given_a_made_up_answer():
    X = sp.csr_matrix(np.array([[0, 4, 0, 1], [2, 0, 0, 0]], dtype=np.float32))
    prep = Preprocessing(gene_panel=(0, 2))
    assert list(prep.nonempty_rows(X)) == [False, True]
    with pytest.raises(EmptyCellError, match="cell 0"):
        prep(X)
    # training batches (validate=False): a zero row, so a thinned or odd training cell never stops a run
    rows = prep(X, validate=False).numpy()
    assert not rows[0].any() and rows[1, 0] > 0


def test_the_panel_is_scanpys_highly_variable_genes_of_the_normalised_cells():
    X = _counts(1, n_cells=300, n_genes=200)
    X[:, 190:] = 0  # never expressed: never chosen
    X = sp.csr_matrix(X)
    X.eliminate_zeros()
    panel = highly_variable_panel(X, Preprocessing(), 50)
    a = ad.AnnData(X[:, :190].copy())
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    sc.pp.highly_variable_genes(a, n_top_genes=50, flavor="seurat")
    assert panel == tuple(np.flatnonzero(a.var["highly_variable"].to_numpy()))
    assert len(panel) == 50 and list(panel) == sorted(panel)
    assert highly_variable_panel(X, Preprocessing(), 500) == tuple(range(190))  # fewer expressed genes: all of them


def test_the_marker_panel_gives_every_pair_of_classes_its_genes_a_rare_class_included():
    """Three classes: 'a' (200 cells) marked by gene 0, 'b' (200) by gene 1, 'rare' (6 cells) by gene 2; gene 3 is
    the most variable gene, in every class alike (a label-blind programme): not a marker of any pair."""
    rng = np.random.default_rng(0)
    labels = np.array(["a"] * 200 + ["b"] * 200 + ["rare"] * 6)
    X = rng.poisson(2.0, (len(labels), 40)).astype(np.float32)
    X[:, 3] = rng.choice([0, 200], size=len(labels))
    for gene, label in enumerate(["a", "b", "rare"]):
        X[labels == label, gene] += 30
    X = sp.csr_matrix(X)
    panel = marker_panel(X, labels, Preprocessing(), 3)
    assert panel == (0, 1, 2)
    logged = np.log1p(X.multiply(1e4 / X.sum(axis=1)).toarray())
    assert logged.var(axis=0).argmax() == 3
    wider = marker_panel(X, labels, Preprocessing(), 10)
    assert len(wider) == 10 and set(panel) <= set(wider) and list(wider) == sorted(wider)
    with pytest.raises(ValueError, match="at least two classes"):
        marker_panel(X, np.array(["a"] * len(labels)), Preprocessing(), 3)


def _training_cells(out, pbmc, predictor):
    """The run's training split (its splits.csv) of the demo's cells, aligned by the run's own gene alignment, and
    their labels."""
    splits = np.loadtxt(out / "splits.csv", delimiter=",", dtype=str, skiprows=1)
    train = pbmc.raw.to_adata()[[c for c, s in splits if s == "train"]]
    aligned = predictor.alignment(list(train.var_names)).apply(sp.csr_matrix(train.X))
    return aligned, pbmc.obs.loc[train.obs_names, "bulk_labels"].astype(str).to_numpy()


def test_a_run_with_a_marker_panel_chooses_it_on_the_training_cells_labels(tmp_path, pbmc):
    from scimilarity_lora.inference.predictor import CellTypePredictor
    from scimilarity_lora.training.run import run

    out = tmp_path / "run"
    run(compose_train(FAST + ["data.gene_panel=150", "data.gene_panel_method=markers", "trainer.max_epochs=1"], out))
    panel = json.loads((out / "model" / "model_config.json").read_text())["preprocessing"]["gene_panel"]
    aligned, labels = _training_cells(out, pbmc, CellTypePredictor.load(out / "model"))
    prep = Preprocessing(input_is_log1p=True)
    assert panel == list(marker_panel(aligned, labels, prep, 150))  # the training labels' markers ...
    assert panel != list(highly_variable_panel(aligned, prep, 150))  # ... not the variable genes
    with pytest.raises(Exception, match="gene_panel_method must be one of"):
        run(compose_train(FAST + ["data.gene_panel=150", "data.gene_panel_method=hvg"], tmp_path / "bad"))


def test_a_run_with_a_panel_saves_it_and_its_predictions_ignore_every_other_gene(tmp_path, pbmc):
    from scimilarity_lora.inference.predictor import CellTypePredictor
    from scimilarity_lora.training.run import run

    out = tmp_path / "run"
    run(compose_train(FAST + ["data.gene_panel=200"], out))
    spec = json.loads((out / "model" / "model_config.json").read_text())
    panel = spec["preprocessing"]["gene_panel"]
    assert len(panel) == 200 and panel == sorted(panel)
    # chosen on the training split only: the same genes as the panel of those cells
    predictor = CellTypePredictor.load(out / "model")
    genes = list(predictor.genes)
    aligned, _ = _training_cells(out, pbmc, predictor)
    assert list(highly_variable_panel(aligned, Preprocessing(input_is_log1p=True), 200)) == panel
    raw = pbmc.raw.to_adata()
    position = {g: i for i, g in enumerate(genes)}

    # shuffling each cell's values among the genes outside the panel keeps its depth: no prediction may move
    X = np.asarray(raw.X.todense() if sp.issparse(raw.X) else raw.X, dtype=np.float32)
    inside = np.isin([position.get(g, -1) for g in raw.var_names], panel)
    shuffled = X.copy()
    rng = np.random.default_rng(0)
    for row in shuffled:
        row[~inside] = rng.permutation(row[~inside])
    before, _ = predictor.predict(X, list(raw.var_names), input_is_log1p=True)
    after, _ = predictor.predict(shuffled, list(raw.var_names), input_is_log1p=True)
    np.testing.assert_allclose(after, before, atol=1e-5)
    # ... while shuffling inside the panel does move them
    inside_shuffled = X.copy()
    for row in inside_shuffled:
        row[inside] = rng.permutation(row[inside])
    moved, _ = predictor.predict(inside_shuffled, list(raw.var_names), input_is_log1p=True)
    assert np.abs(moved - before).max() > 1e-3


def test_data_missing_the_panels_genes_is_refused_with_the_count(tmp_path, pbmc):
    from scimilarity_lora.genes import GeneAlignmentError
    from scimilarity_lora.inference.predictor import CellTypePredictor
    from scimilarity_lora.training.run import run

    out = tmp_path / "run"
    run(compose_train(FAST + ["data.gene_panel=100", "trainer.max_epochs=1"], out))
    predictor = CellTypePredictor.load(out / "model")
    panel_genes = {predictor.genes[i] for i in predictor.preprocessing.gene_panel}
    raw = pbmc.raw.to_adata()
    outside = raw[:, [g not in panel_genes for g in raw.var_names]]  # 665 of the model's genes, none it sees
    with pytest.raises(GeneAlignmentError, match=r"only 0 of the model's 100 panel genes"):
        predictor.predict(outside.X, list(outside.var_names), input_is_log1p=True, min_overlap=50)
    probs, _ = predictor.predict(raw.X, list(raw.var_names), input_is_log1p=True, min_overlap=50)
    assert probs.shape == (raw.n_obs, len(predictor.classes)) and np.isfinite(probs).all()
