"""Inputs for SCimilarity 0.4.1's own pretraining on exactly the cells our pretraining used (run in this project's
venv, after our run):

- ``train.h5ad``: the sorted PBMCs our run trained on (every labelled cell not in its ``holdout.csv``), aligned to
  its gene order and log-normalised as both pipelines preprocess (SCimilarity's data module reads X as given);
  ``obs.celltype_name`` is the Cell Ontology name of each label (SCimilarity keeps only cells with one), and
  ``obs.study`` one study id.
- ``cl-basic.obo``: the Cell Ontology that ``cellxgene-ontology-guide`` ships (offline), written as OBO with
  ``is_a`` edges, for SCimilarity's ``import_cell_ontology`` (which otherwise downloads it).

    python experiments/scimilarity_reference/prepare.py outputs/scimilarity_side_by_side/ours \
        --out outputs/scimilarity_side_by_side/inputs
"""

from __future__ import annotations

import argparse
from pathlib import Path

import anndata as ad
import pandas as pd
import yaml

from scimilarity_lora.data.io import read_anndata
from scimilarity_lora.genes import align_genes, read_gene_order, symbol_aliases
from scimilarity_lora.preprocess import Preprocessing


def write_cell_ontology_obo(path: Path) -> int:
    """Every CL term with its name and is_a parents, from the ontology cellxgene-ontology-guide ships."""
    from cellxgene_ontology_guide.ontology_parser import OntologyParser

    parser = OntologyParser()
    terms = [t for t in parser.get_term_label_to_id_map("CL").values() if t.startswith("CL:")]
    lines = ["format-version: 1.2", "ontology: cl/cl-basic", ""]
    for term in sorted(set(terms)):
        lines += ["[Term]", f"id: {term}", f"name: {parser.get_term_label(term)}"]
        lines += [f"is_a: {p}" for p in parser.get_term_parents(term) if p.startswith("CL:")]
        lines.append("")
    path.write_text("\n".join(lines))
    return len(set(terms))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("our_run", type=Path, help="our pretraining run dir (holdout.csv, model/, .hydra/config.yaml)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = yaml.safe_load((args.our_run / ".hydra" / "config.yaml").read_text())
    (source,) = cfg["data"]["files"]
    to_cl = cfg["data"]["label_to_ontology"]
    genes = read_gene_order(args.our_run / "model" / "gene_order.tsv")
    adata = read_anndata(source["path"])
    holdout = set(pd.read_csv(args.our_run / "holdout.csv")["cell_id"].astype(str))
    adata = adata[~adata.obs_names.isin(holdout)]
    alignment = align_genes(list(adata.var_names), genes, aliases=symbol_aliases())
    X = Preprocessing()(alignment.apply(adata.X), output="sparse").to_csr()
    from cellxgene_ontology_guide.ontology_parser import OntologyParser

    parser = OntologyParser()
    labels = adata.obs[source["label_key"]].astype(str)
    obs = pd.DataFrame({"celltype_name": [parser.get_term_label(to_cl[l]) for l in labels], "label": labels.values,
                        "study": "mudan_sorted_pbmc"}, index=adata.obs_names)
    ad.AnnData(X=X.astype("float32"), obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(args.out / "train.h5ad")
    n_terms = write_cell_ontology_obo(args.out / "cl-basic.obo")
    (args.out / "gene_order.tsv").write_text("\n".join(genes) + "\n")
    print(f"{args.out}: {X.shape[0]} cells x {X.shape[1]} genes, {n_terms} CL terms")


if __name__ == "__main__":
    main()
