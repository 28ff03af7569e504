"""Pretrain a SCimilarity base with SCimilarity's objective: compose conf/pretrain.yaml and run it.

    python pretrain.py data.files='[{path: a.h5ad, label_key: cell_type}, {path: b.h5ad}]'
    python pretrain.py init_from=/path/to/model_v1.1 ...      # continue pretraining an existing model folder
"""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from scimilarity_lora.training.resolvers import register
from scimilarity_lora.user_errors import one_line_errors

register()
CONF = Path(__file__).resolve().parent / "conf"


def refuse_training_data_options(argv: list[str]) -> None:
    """``data=h5ad`` (how train.py takes a file, so what a user tries first) names a *training* data option:
    refuse it with the pretraining form instead of a composition error or an AttributeError deep inside."""
    for arg in argv:
        if not arg.startswith("data="):
            continue
        name = arg.split("=", 1)[1]
        path = CONF / "data" / f"{name}.yaml"
        if path.is_file() and not name.startswith("pretrain_"):  # conf/data/pretrain_*: the pretraining options
            print(f"error: data={name} is a training data option; pretraining takes its inputs as "
                  "data.files='[{path: cells.h5ad, label_key: cell_type}, {path: more.h5ad}]' "
                  "(label_key optional), or data=pretrain_census_stream / data=pretrain_census for the Census",
                  file=sys.stderr)
            sys.exit(2)


@hydra.main(version_base="1.3", config_path="conf", config_name="pretrain")
@one_line_errors
def main(cfg: DictConfig) -> float | None:
    from scimilarity_lora.training.pretrain_run import run_pretraining

    return run_pretraining(cfg)


if __name__ == "__main__":
    refuse_training_data_options(sys.argv[1:])
    main()
