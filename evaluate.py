"""Evaluate a training run: python evaluate.py run_dir=outputs/runs/<date>/<time>  (see conf/evaluate.yaml).

With ``query.path=<other.h5ad> query.label_key=<col>`` it scores the run on another study's labelled cells instead.
"""

import hydra
from omegaconf import DictConfig, OmegaConf

from scimilarity_lora.user_errors import one_line_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
@one_line_errors
def main(cfg: DictConfig) -> None:
    if cfg.get("query") and cfg.query.get("path"):
        from scimilarity_lora.evaluation.query import evaluate_query_run

        evaluate_query_run(cfg.run_dir, OmegaConf.to_container(cfg.query, resolve=True), cfg.wandb_project)
        return
    from scimilarity_lora.evaluation.evaluate import evaluate_run

    evaluate_run(cfg.run_dir, knn_k=cfg.knn_k, target_accuracy=cfg.target_accuracy, baselines=cfg.baselines,
                 max_baseline_cells=cfg.max_baseline_cells, wandb_project=cfg.wandb_project,
                 reference=dict(cfg.reference) if cfg.get("reference") else None)


if __name__ == "__main__":
    main()
