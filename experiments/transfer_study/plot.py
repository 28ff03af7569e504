"""Target macro-F1 against retention (kNN accuracy on the held-out sorted PBMCs, transferred from the sorted cells
used in pretraining, in the adapted embedding), one point per base, method and rank, with the seeds' sd as error
bars; each base's own retention as a dotted vertical line, genes + logistic regression as a dashed horizontal one.

    python experiments/transfer_study/plot.py experiments/transfer_study/runs.csv
"""

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

path = Path(sys.argv[1] if len(sys.argv) > 1 else "experiments/transfer_study/runs.csv")
runs = pd.read_csv(path)
colours = dict(zip(runs["base"].unique(), ["tab:blue", "tab:orange", "tab:grey"]))
markers = {"full fine-tuning": "s", "frozen base + linear probe": "D"}
fig, ax = plt.subplots(figsize=(9, 6))
for (base, method), g in runs.groupby(["base", "method"], sort=False):
    x, y = g["heldout_knn_acc"], g["test_macro_f1"]
    marker = markers.get(method, "o")
    ax.errorbar(x.mean(), y.mean(), xerr=x.std(), yerr=y.std(), fmt=marker, color=colours[base], capsize=3,
                ms=6 if marker == "o" else 7, alpha=0.85)
    short = method.replace("LoRA ", "").replace("frozen base + linear probe", "probe").replace("full fine-tuning", "full")
    ax.annotate(short, (x.mean(), y.mean()), fontsize=6.5, xytext=(4, 3), textcoords="offset points")
for base, g in runs.groupby("base", sort=False):
    ax.axvline(g["heldout_knn_acc_base"].mean(), color=colours[base], ls=":", lw=1)
    ax.plot([], [], "o", color=colours[base], label=f"base: {base}")
ax.axhline(runs["genes_lr_macro_f1"].mean(), color="black", ls="--", lw=1, label="genes + logistic regression")
ax.plot([], [], "s", color="black", label="full fine-tuning")
ax.plot([], [], "D", color="black", label="frozen base + linear probe")
ax.set_xlabel("retention: kNN accuracy on held-out sorted PBMCs in the adapted embedding (dotted: the base's own)")
ax.set_ylabel("target: test macro-F1 on pbmc68k_reduced")
ax.set_title("Study 2: target task against retention (mean +- sd over 3 seeds)")
ax.legend(fontsize=8, loc="lower right")
ax.grid(alpha=0.3)
fig.tight_layout()
out = path.parent / "macro_f1_vs_retention.png"
fig.savefig(out, dpi=120)
print(out)
