"""Does SCimilarity 0.4.1's own ``CellEmbedding`` load a folder our ``pretrain.py`` wrote, unchanged, and embed
cells as our encoder does? Run with a Python that has scimilarity==0.4.1 (see README.md); prints the max abs
difference of the embeddings of the first 500 sorted PBMCs.

    /work/scim-venv/bin/python experiments/scimilarity_reference/cell_embedding_check.py \
        outputs/pretrained_base_demo/model ../shared/data/real/mudan_sorted_pbmc.h5ad
"""

import sys

import anndata as ad
import numpy as np
import torch

folder, path = sys.argv[1], sys.argv[2]
from scimilarity import CellEmbedding  # noqa: E402
from scimilarity.utils import align_dataset, lognorm_counts  # noqa: E402

ce = CellEmbedding(model_path=folder, use_gpu=False)
adata = ad.read_h5ad(path)[:500].copy()
adata.layers["counts"] = adata.X.copy()
aligned = align_dataset(adata, ce.gene_order, gene_overlap_threshold=100)
normed = lognorm_counts(aligned)
theirs = ce.get_embeddings(normed.X)

# ours: the same cells through our folder loader and preprocessing (aliases off: SCimilarity matches by name only)
from scimilarity_lora.genes import align_genes  # noqa: E402
from scimilarity_lora.model.folder import load_model_folder  # noqa: E402
from scimilarity_lora.preprocess import Preprocessing  # noqa: E402

encoder, genes = load_model_folder(folder)
x = Preprocessing()(align_genes(list(adata.var_names), genes, min_overlap=1).apply(adata.X), output="dense")
with torch.no_grad():
    ours = encoder.eval()(x).numpy()
print(f"cells {len(ours)}, embedding dim {ours.shape[1]}, max abs diff {np.abs(ours - theirs).max():.2e}")
