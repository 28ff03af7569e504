"""``python -m scimilarity_lora.inference.reference build ...`` (see the package docstring)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from scimilarity_lora.user_errors import one_line_errors


def model_dir(path: str) -> Path:
    """A run directory's ``model/``, or the model directory itself."""
    p = Path(path)
    return p / "model" if (p / "model").is_dir() else p


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    from scimilarity_lora.inference.reference.build import build_index

    parser = argparse.ArgumentParser(prog="python -m scimilarity_lora.inference.reference",
                                     description="Reference indices for kNN annotation and cell search.")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="embed a labelled reference and index it")
    b.add_argument("model", help="a run directory or a model directory")
    b.add_argument("reference", help="a labelled .h5ad, a bundled dataset name, or a SOMA store directory")
    b.add_argument("--out", required=True, help="the index directory to write")
    b.add_argument("--label-key", required=True, help="obs column of the reference labels")
    b.add_argument("--keep-obs", default="", help="comma-separated obs columns to keep for search answers")
    b.add_argument("--base", action="store_true", help="index the base encoder's embedding, not the adapted one")
    b.add_argument("--layer", default="X", help="X, raw, or a layer name (.h5ad)")
    b.add_argument("--log1p", action="store_true", help="the matrix is log1p(normalize_total), not raw counts")
    b.add_argument("--gene-symbols-key", default=None)
    b.add_argument("--obs-filter", default=None, help="SOMA value filter, e.g. \"tissue_general == 'blood'\"")
    b.add_argument("--batch-size", type=int, default=4096)
    b.add_argument("--M", type=int, default=16, help="hnsw graph degree")
    b.add_argument("--ef-construction", type=int, default=200)
    b.add_argument("--ef", type=int, default=100, help="hnsw search breadth (>= k)")
    b.add_argument("--novelty-quantile", type=float, default=0.99)
    b.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = build_index(model_dir(args.model), args.reference, args.out, label_key=args.label_key,
                      keep_obs=[c for c in args.keep_obs.split(",") if c], base=args.base, layer=args.layer,
                      input_is_log1p=args.log1p, gene_symbols_key=args.gene_symbols_key, obs_filter=args.obs_filter,
                      batch_size=args.batch_size, M=args.M, ef_construction=args.ef_construction, ef=args.ef,
                      novelty_quantile=args.novelty_quantile, progress=not args.no_progress)
    print(out)


if __name__ == "__main__":
    main()
