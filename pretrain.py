"""Pretrain a SCimilarity base with SCimilarity's objective: compose conf/pretrain.yaml and run it.

    python pretrain.py data.files='[{path: a.h5ad, label_key: cell_type}, {path: b.h5ad}]'
    python pretrain.py init_from=/path/to/model_v1.1 ...      # continue pretraining an existing model folder
"""

import hydra
from omegaconf import DictConfig

from scimilarity_lora.training.resolvers import register
from scimilarity_lora.user_errors import one_line_errors

register()


@hydra.main(version_base="1.3", config_path="conf", config_name="pretrain")
@one_line_errors
def main(cfg: DictConfig) -> float | None:
    from scimilarity_lora.training.pretrain_run import run_pretraining

    return run_pretraining(cfg)


if __name__ == "__main__":
    main()
