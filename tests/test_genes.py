import numpy as np
import pytest
import scipy.sparse as sp

from scimilarity_lora.genes import GeneAlignmentError, align_genes, read_gene_order


def test_alignment_reorders_zero_fills_and_drops():
    model = ["A", "B", "C", "D"]
    data = ["C", "X", "A"]  # X is unknown, B and D are missing
    X = sp.csr_matrix(np.array([[1.0, 7.0, 2.0], [0.0, 5.0, 3.0]]))
    al = align_genes(data, model)
    out = al.apply(X).toarray()
    np.testing.assert_array_equal(out, [[2.0, 0.0, 1.0, 0.0], [3.0, 0.0, 0.0, 0.0]])
    assert al.n_overlap == 2 and al.unknown_genes == ("X",)
    assert al.summary() == {"n_model_genes": 4, "n_data_genes": 3, "n_overlap": 2, "overlap_fraction": 0.5,
                            "n_unknown": 1, "n_rescued_by_alias": 0, "rescued_by_alias": {}}


def test_alignment_accepts_ensembl_ids_through_a_column():
    model = ["ENSG1", "ENSG2", "CD3D"]
    al = align_genes(["foo", "CD3D", "bar"], model, data_gene_ids=["ENSG2", "ENSG9", "ENSG1"])
    out = al.apply(np.array([[1.0, 2.0, 3.0]])).toarray()
    np.testing.assert_array_equal(out, [[3.0, 1.0, 2.0]])


def test_too_few_overlapping_genes_is_a_clear_error():
    with pytest.raises(GeneAlignmentError, match=r"only 1 of the model's 3 genes .* at least 2"):
        align_genes(["A", "Z"], ["A", "B", "C"], min_overlap=2)


def test_ensembl_ids_where_symbols_expected_gets_a_hint(real_gene_order):
    ids = [f"ENSG{i:011d}" for i in range(300)]
    with pytest.raises(GeneAlignmentError, match="look like Ensembl ids"):
        align_genes(ids, real_gene_order, min_overlap=10)


def test_duplicated_gene_names_are_refused():
    with pytest.raises(GeneAlignmentError, match="more than once"):
        align_genes(["A", "B", "A"], ["A", "B"])


def test_alignment_refuses_a_matrix_of_another_width():
    al = align_genes(["A", "B"], ["A", "B"])
    with pytest.raises(GeneAlignmentError, match="3 gene columns"):
        al.apply(np.ones((1, 3)))


def test_real_gene_order_and_bundled_pbmc_overlap(real_gene_order, pbmc):
    assert len(real_gene_order) == 28231
    assert real_gene_order[:3] == ["A1BG", "A1BG-AS1", "A1CF"]
    al = align_genes(pbmc.raw.var_names, real_gene_order)
    # 49 of the 765 bundled genes carry pre-2016 symbols (TCEB2, HMHA1, UFD1L, ...) absent from SCimilarity's order
    assert al.n_overlap == 716
    assert {"TCEB2", "HMHA1", "UFD1L"} <= set(al.unknown_genes)


def test_gene_order_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_gene_order(tmp_path / "nope.tsv")
    (tmp_path / "dup.tsv").write_text("A\nB\nA\n")
    with pytest.raises(GeneAlignmentError, match="more than once"):
        read_gene_order(tmp_path / "dup.tsv")


# -- old and alias symbols ---------------------------------------------------------------------------------------
def test_the_package_ships_scimilaritys_gene_order():
    from scimilarity_lora.genes import resolve_gene_order, scimilarity_gene_order

    genes = scimilarity_gene_order()
    assert len(genes) == 28231 and genes[:3] == ["A1BG", "A1BG-AS1", "A1CF"] and genes[-1] == "ZZZ3"
    assert resolve_gene_order("scimilarity") == genes


def test_bundled_pbmc_rescues_32_old_symbols(real_gene_order, pbmc):
    from scimilarity_lora.genes import symbol_aliases

    data = list(pbmc.raw.var_names)
    plain = align_genes(data, real_gene_order)
    al = align_genes(data, real_gene_order, aliases=symbol_aliases())
    assert (plain.n_overlap, len(plain.unknown_genes)) == (716, 49)
    assert al.n_overlap == 748 and len(al.rescued) == 32 and len(al.unknown_genes) == 17
    rescued = dict(al.rescued)
    assert rescued["TCEB2"] == "ELOB" and rescued["HMHA1"] == "ARHGAP45" and rescued["IGJ"] == "JCHAIN"
    # the rescued column feeds the model gene it names
    X = sp.identity(len(data), format="csr", dtype=np.float32)
    out = al.apply(X)
    i, j = data.index("TCEB2"), real_gene_order.index("ELOB")
    assert out[i, j] == 1.0 and out[i].nnz == 1
    assert al.summary()["n_rescued_by_alias"] == 32 and al.summary()["rescued_by_alias"]["UFD1L"] == "UFD1"


def test_an_alias_never_displaces_a_gene_the_data_has_by_name():
    model = ["ELOB", "CD3D"]
    al = align_genes(["TCEB2", "ELOB", "CD3D"], model, aliases={"TCEB2": "ELOB"})
    assert al.rescued == () and al.unknown_genes == ("TCEB2",) and al.unused_aliases == ("TCEB2",)
    assert list(al.source_index[al.target_index == 0]) == [1]
    alone = align_genes(["TCEB2", "CD3D"], model, aliases={"TCEB2": "ELOB"})  # a subset where the alias is used
    assert alone.rescued == (("TCEB2", "ELOB"),) and alone.unused_aliases == ()


def test_two_data_symbols_naming_one_model_gene_are_ambiguous():
    al = align_genes(["OLD1", "OLD2", "CD3D"], ["NEW", "CD3D"], aliases={"OLD1": "NEW", "OLD2": "NEW"})
    assert al.rescued == () and set(al.unknown_genes) == {"OLD1", "OLD2"} and al.n_overlap == 1
    assert al.unused_aliases == ("OLD1", "OLD2")
    assert align_genes(["NOALIAS", "CD3D"], ["NEW", "CD3D"], aliases={"OLD1": "NEW"}).unused_aliases == ()


def test_without_unused_aliases_every_subset_aligns_as_the_whole_restricted_to_it():
    """The ground on which the service aligns a batch's union of genes once (GeneAlignment.unused_aliases)."""
    rng = np.random.default_rng(0)
    model = ["NEW", "CD3D", "GNLY", "MS4A1", "OTHER"]
    aliases = {"OLD1": "NEW", "OLD2": "NEW", "OLDG": "GNLY", "GONE": "NOT_IN_MODEL"}
    pool = ["OLD1", "OLD2", "OLDG", "GONE", "CD3D", "GNLY", "MS4A1", "X1", "X2"]
    checked = 0
    for _ in range(300):
        genes = list(rng.choice(pool, size=int(rng.integers(2, len(pool))), replace=False))
        whole = align_genes(genes, model, aliases=aliases, min_overlap=0)
        if whole.unused_aliases:
            continue
        checked += 1
        mapping = dict(zip((genes[i] for i in whole.source_index), whole.target_index.tolist()))
        subset = [g for g in genes if rng.random() < 0.5]
        part = align_genes(subset, model, aliases=aliases, min_overlap=0)
        assert dict(zip((subset[i] for i in part.source_index), part.target_index.tolist())) == {
            g: j for g, j in mapping.items() if g in subset}
    assert checked > 50


def test_reverse_direction_maps_a_new_name_to_the_models_old_one():
    from scimilarity_lora.genes import symbol_aliases

    al = align_genes(["AARS1"], ["AARS", "CD3D"], aliases=symbol_aliases())
    assert al.rescued == (("AARS1", "AARS"),)


def test_inference_aligns_through_aliases_like_training(real_gene_order):
    """The predictor (annotate, the service) rescues old symbols exactly when the model was trained to."""
    from helpers import make_predictor

    predictor = make_predictor(real_gene_order)
    X = sp.csr_matrix(np.array([[5.0, 3.0]], dtype=np.float32))
    old = predictor.predict(X, ["TCEB2", "CD3D"])[0]
    new = predictor.predict(X, ["ELOB", "CD3D"])[0]
    np.testing.assert_allclose(old, new, atol=1e-7)
    assert predictor.alignment(["TCEB2", "CD3D"]).n_overlap == 2
    assert make_predictor(real_gene_order, gene_aliases=False).alignment(["TCEB2", "CD3D"]).n_overlap == 1


def test_ambiguous_alias_symbols_are_logged_once_per_gene_list_not_once_per_gene(caplog):
    """A request naming many ambiguous alias symbols wrote one WARNING per gene (503 lines for one request)."""
    import logging
    from collections import defaultdict

    from scimilarity_lora.genes import align_genes, scimilarity_gene_order, symbol_aliases

    order = scimilarity_gene_order()
    in_order = set(order)
    by_target = defaultdict(list)
    for alias, target in symbol_aliases().items():
        if target in in_order and alias not in in_order:
            by_target[target].append(alias)
    groups = [aliases[:2] for aliases in by_target.values() if len(aliases) >= 2][:50]
    assert len(groups) == 50
    data = [g for pair in groups for g in pair] + order[:100]
    with caplog.at_level(logging.WARNING, logger="scimilarity_lora.genes"):
        alignment = align_genes(data, order, aliases=symbol_aliases())
    lines = [r for r in caplog.records if "old/alias" in r.getMessage()]
    assert len(lines) == 1 and lines[0].getMessage().startswith("50 model genes are named by several")
    assert alignment.n_overlap == 100  # none of the ambiguous symbols is used
