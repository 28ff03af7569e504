"""Target macro-F1 against retention (cosine of base vs adapted embeddings of unlabelled real PBMCs), one point per
method with the seeds' sd as error bars, baselines as lines.

    python experiments/transfer_study/plot.py experiments/transfer_study/runs.csv
"""

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

runs = pd.read_csv(sys.argv[1] if len(sys.argv) > 1 else "experiments/transfer_study/runs.csv")
stats = runs.groupby("method").agg(["mean", "std"])
fig, ax = plt.subplots(figsize=(7, 4.5))
for method, row in stats.iterrows():
    ax.errorbar(row[("unlabelled_cosine", "mean")], row[("test_macro_f1", "mean")],
                xerr=row[("unlabelled_cosine", "std")], yerr=row[("test_macro_f1", "std")], fmt="o", capsize=4,
                label=method)
ax.axhline(runs["genes_lr_macro_f1"].mean(), color="grey", ls="--", lw=1, label="genes + logistic regression")
ax.axhline(runs["frozen_emb_lr_macro_f1"].mean(), color="grey", ls=":", lw=1,
           label="frozen embeddings + logistic regression")
ax.set_xlabel("retention: cosine(base, adapted) on unlabelled real PBMCs (1 = unchanged)")
ax.set_ylabel("test macro-F1 (pbmc68k_reduced)")
ax.set_title("Pretrained base: target task against what is kept (3 seeds)")
ax.legend(fontsize=8, loc="lower left")
ax.grid(alpha=0.3)
fig.tight_layout()
out = Path(sys.argv[1] if len(sys.argv) > 1 else "experiments/transfer_study/runs.csv").parent / "macro_f1_vs_retention.png"
fig.savefig(out, dpi=120)
print(out)
