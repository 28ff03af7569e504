"""Write the demo base's gene order: SCimilarity's genes that the bundled pbmc68k_reduced measures, in SCimilarity's
order (aliases resolved the way training resolves them), so the demo base is SCimilarity's architecture over a
subset of SCimilarity's own vocabulary.

    python experiments/pretrained_base/demo_gene_order.py experiments/pretrained_base/demo_gene_order.tsv
"""

from __future__ import annotations

import sys

from scimilarity_lora.data.io import read_anndata
from scimilarity_lora.genes import align_genes, scimilarity_gene_order, symbol_aliases, write_gene_order


def demo_gene_order() -> list[str]:
    adata = read_anndata("pbmc68k_reduced")
    order = scimilarity_gene_order()
    alignment = align_genes(list(adata.raw.var_names), order, aliases=symbol_aliases())
    return [order[i] for i in sorted(alignment.target_index.tolist())]


if __name__ == "__main__":
    genes = demo_gene_order()
    write_gene_order(genes, sys.argv[1])
    print(f"{len(genes)} genes -> {sys.argv[1]}")
