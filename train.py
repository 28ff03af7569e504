"""Train: compose the Hydra config in conf/ and run it.

    python train.py                               # embedded default: LoRA on bundled PBMC data, CPU, minutes
    python train.py lora.r=8 trainer.max_epochs=3
    python train.py --multirun lora.r=4,8,16
"""

import hydra
from omegaconf import DictConfig

from scimilarity_lora.training.resolvers import register
from scimilarity_lora.user_errors import one_line_errors

register()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@one_line_errors
def main(cfg: DictConfig) -> float | None:
    from scimilarity_lora.training.run import run  # imported lazily: config errors surface before heavy imports

    return run(cfg)


if __name__ == "__main__":
    main()
