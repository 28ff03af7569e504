"""Evaluate a training run: python evaluate.py run_dir=outputs/runs/<date>/<time>  (see conf/evaluate.yaml)."""

import hydra
from omegaconf import DictConfig

from scimilarity_lora.training.user_errors import one_line_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
@one_line_errors
def main(cfg: DictConfig) -> None:
    from scimilarity_lora.evaluation.evaluate import evaluate_run

    evaluate_run(cfg.run_dir, knn_k=cfg.knn_k, target_accuracy=cfg.target_accuracy, baselines=cfg.baselines,
                 max_baseline_cells=cfg.max_baseline_cells, wandb_project=cfg.wandb_project,
                 reference=dict(cfg.reference) if cfg.get("reference") else None)


if __name__ == "__main__":
    main()
