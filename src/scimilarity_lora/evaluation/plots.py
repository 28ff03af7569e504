"""Figures a person wants after a run: learning curves and a normalised confusion matrix."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def headless_pyplot():
    """pyplot on the Agg backend for runs that only write files, unless a backend was chosen already (a notebook's
    inline backend sets ``MPLBACKEND``; a session that imported pyplot has one): then its figures still display."""
    import os
    import sys

    import matplotlib

    if not os.environ.get("MPLBACKEND") and "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion_matrix(cm: Sequence[Sequence[float]], classes: Sequence[str], path: str | Path,
                          title: str = "Test confusion matrix (row-normalised)",
                          row_labels: Sequence[str] | None = None, ylabel: str = "true") -> Path:
    """Row-normalised counts; ``row_labels`` for a rectangular table (e.g. another study's labels x classes)."""
    plt = headless_pyplot()
    cm = np.asarray(cm, dtype=float)
    rows = list(row_labels) if row_labels is not None else list(classes)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    n, m = len(rows), len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * m + 0.08 * max(len(r) for r in rows), 0.8 + 0.5 * n))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(m), classes, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), [f"{c} (n={int(s)})" for c, s in zip(rows, cm.sum(axis=1))], fontsize=8)
    for i in range(n):
        for j in range(m):
            if norm[i, j] >= 0.01:
                ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def learning_curves_figure(rows: list[dict[str, float]]):
    """Train and validation loss and macro-F1 per epoch (one row per epoch, both splits of the same epoch)."""
    plt = headless_pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    epochs = [int(r["epoch"]) for r in rows]
    for key, ax in (("loss", a), ("macro_f1", b)):
        for split in ("train", "val"):
            values = [r.get(f"{split}/{key}", np.nan) for r in rows]
            ax.plot(epochs, values, marker="o", label=split)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.set_title(key)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_learning_curves(rows: list[dict[str, float]], path: str | Path) -> Path:
    fig = learning_curves_figure(rows)
    fig.savefig(path, dpi=120)
    headless_pyplot().close(fig)
    return Path(path)


def plot_embeddings(z_base: np.ndarray, z_adapted: np.ndarray, y: np.ndarray, predicted: np.ndarray,
                    classes: Sequence[str], path: str | Path, seed: int = 0) -> Path:
    """UMAPs of the same cells' embeddings, base encoder beside adapted encoder, coloured by true label, with the
    adapted model's misclassified cells ringed. scanpy's own neighbours graph and UMAP on each embedding."""
    import anndata as ad
    import pandas as pd
    import scanpy as sc

    plt = headless_pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    labels = pd.Categorical(np.asarray(classes, dtype=object)[y], categories=list(classes))
    wrong = predicted != y
    for ax, (title, z) in zip(axes, (("base encoder", z_base), ("adapted encoder", z_adapted))):
        cells = ad.AnnData(np.zeros((len(z), 1), dtype=np.float32), obs=pd.DataFrame({"cell type": labels}))
        cells.obsm["X_embedding"] = np.asarray(z, dtype=np.float32)
        # sklearn's exact neighbours: scanpy 1.11 picks pynndescent above 4,096 cells, whose graph it then reads
        # with csr_array.getnnz, which SciPy 1.17 no longer has (an AttributeError on every test split that size)
        sc.pp.neighbors(cells, use_rep="X_embedding", n_neighbors=max(2, min(15, len(z) - 1)), random_state=seed,
                        transformer="sklearn")
        sc.tl.umap(cells, random_state=seed)
        last = ax is axes[-1]
        sc.pl.umap(cells, color="cell type", ax=ax, show=False, title=title, size=30,
                   legend_loc="right margin" if last else "none", frameon=False)
        if last and wrong.any():
            xy = cells.obsm["X_umap"][wrong]
            ax.scatter(xy[:, 0], xy[:, 1], s=70, facecolors="none", edgecolors="black", linewidths=0.9,
                       label=f"misclassified ({int(wrong.sum())})")
            ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.suptitle(f"Test cells ({len(y)}): base vs adapted embedding (UMAP)")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return Path(path)
