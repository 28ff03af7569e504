"""The notebook front door, on top of the Hydra machinery (not beside it)::

    import scimilarity_lora as sl
    run = sl.fit(adata, "cell_type", overrides=["lora.r=4"])    # the same config and code as python train.py
    run.annotate(other)                                          # results in other.obs / other.obsm
    run.evaluate(query=other, label_key="cell_type")             # the cross-study report
    sl.Run.load("outputs/runs/2026-12-02/10-00-00").metrics

:func:`fit` composes ``conf/train.yaml`` with Hydra's compose API and the very override strings the command line
takes, sets the run directory as ``train.py`` does (``outputs/runs/<date>/<time>`` under the working directory, or
``run_dir``), and runs :func:`scimilarity_lora.training.run.run` with the AnnData in memory (``data=h5ad`` with the
AnnData instead of a file; the run's recorded ``data.path`` says so). :func:`pretrain` does the same for
``pretrain.py``. Sweeps stay ``python train.py --multirun ...``. Bad input raises the same one-line errors the
command lines print (``ValueError`` subclasses), never ``sys.exit``.

The configuration is read from the repository's ``conf/`` (the package is installed editable, as the README's set-up
does) or from ``$SCIMILARITY_LORA_CONF``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import anndata as ad
    from matplotlib.figure import Figure
    from omegaconf import DictConfig

    from scimilarity_lora.inference.predictor import CellTypePredictor

CONF_ENV = "SCIMILARITY_LORA_CONF"


class RunError(ValueError):
    """Not a finished run directory, or no configuration to compose."""


def config_dir() -> Path:
    """``$SCIMILARITY_LORA_CONF``, else the repository's ``conf/`` beside ``src/``."""
    folder = Path(os.environ.get(CONF_ENV) or Path(__file__).resolve().parents[2] / "conf")
    if not (folder / "train.yaml").is_file():
        raise RunError(f"no Hydra configuration at {folder} (conf/train.yaml): install the package from its "
                       f"repository (pip install -e .) or set {CONF_ENV}=<the repository's conf/>")
    return folder


def compose(config_name: str, overrides: Sequence[str] = (), run_dir: str | Path | None = None) -> "DictConfig":
    """The config ``python <config_name>.py <overrides>`` would run, its run directory resolved as the CLI does."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    from scimilarity_lora.training.resolvers import register

    register()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = hydra_compose(config_name, overrides=list(overrides), return_hydra_config=True)
    out = str(run_dir) if run_dir is not None else OmegaConf.to_container(cfg.hydra.run, resolve=True)["dir"]
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(Path(out).absolute())
        cfg.hydra.job.name = config_name
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(Path(out).absolute())
        del cfg["hydra"]  # as in a real run: the task function never sees the hydra node
    return cfg


def fit(adata: "ad.AnnData", label_key: str, *, overrides: Sequence[str] = (),
        run_dir: str | Path | None = None) -> "Run":
    """Fine-tune on ``adata`` (labels in ``adata.obs[label_key]``) with the defaults of ``python train.py data=h5ad``
    (LoRA on SCimilarity's architecture over its full gene order, seeing the 2,000 most variable genes of the
    training cells: ``data.gene_panel``) and ``overrides`` on top, e.g.
    ``["lora.r=4", "data.layer=counts", "model.pretrained_dir=/path/to/model_v1.1"]``."""
    from omegaconf import open_dict

    from scimilarity_lora.training.run import run as run_training

    cfg = compose("train", ["data=h5ad", f"data.label_key={label_key}", *overrides], run_dir)
    with open_dict(cfg):
        cfg.data.path = f"in-memory AnnData ({adata.n_obs} cells x {adata.n_vars} genes)"
    run_training(cfg, adata=adata)
    return Run.load(cfg.paths.output_dir)


def pretrain(files: Sequence[dict[str, str]] = (), *, overrides: Sequence[str] = (),
             run_dir: str | Path | None = None) -> Path:
    """Pretrain (or with ``overrides=["init_from=<folder>"]`` continue pretraining) a base as ``pretrain.py`` does;
    ``files``: ``[{"path": "a.h5ad", "label_key": "cell_type"}, {"path": "b.h5ad"}]``. Returns the run directory,
    whose ``model/`` is a SCimilarity model folder (``model.pretrained_dir=<it>`` fine-tunes it)."""
    from scimilarity_lora.training.pretrain_run import run_pretraining

    extra = [f"data.files={json.dumps(list(files))}"] if files else []
    cfg = compose("pretrain", [*extra, *overrides], run_dir)
    run_pretraining(cfg)
    return Path(cfg.paths.output_dir)


@dataclass
class Run:
    """A finished training run directory (``train.py`` or :func:`fit`): its metrics, config, model and plots."""

    path: Path
    _predictor: Any = field(default=None, repr=False)

    @classmethod
    def load(cls, path: str | Path) -> "Run":
        from scimilarity_lora.inference.runs import METRICS_FILE, MODEL_DIR

        folder = Path(path)
        if not (folder / METRICS_FILE).is_file() or not (folder / MODEL_DIR).is_dir():
            raise RunError(f"{folder} is not a finished training run (no {METRICS_FILE} and {MODEL_DIR}/)")
        return cls(folder)

    @property
    def metrics(self) -> dict[str, Any]:
        return json.loads((self.path / "metrics.json").read_text())

    @property
    def config(self) -> "DictConfig":
        """The resolved config the run trained with (as ``model/model_config.json`` records it)."""
        from omegaconf import OmegaConf

        return OmegaConf.create(json.loads((self.path / "model" / "model_config.json").read_text())["training_config"])

    @property
    def predictor(self) -> "CellTypePredictor":
        """The run's model as annotation and serving load it (loaded once)."""
        if self._predictor is None:
            from scimilarity_lora.inference.predictor import CellTypePredictor

            self._predictor = CellTypePredictor.load(self.path / "model")
        return self._predictor

    def plot_learning_curves(self) -> "Figure":
        """Train/validation loss and metrics per epoch (the figure ``plots/learning_curves.png`` holds)."""
        from scimilarity_lora.evaluation.plots import learning_curves_figure

        return learning_curves_figure(self.metrics["history"])

    def annotate(self, adata: "ad.AnnData", **kwargs: Any) -> "ad.AnnData":
        """:func:`scimilarity_lora.inference.annotate.annotate` with this run's model: labels in ``adata.obs``."""
        from scimilarity_lora.inference.annotate import annotate

        return annotate(adata, self.predictor, **kwargs)

    def evaluate(self, query: "ad.AnnData | str | Path", label_key: str = "cell_type", *, name: str | None = None,
                 write: bool = True, **kwargs: Any) -> dict[str, Any]:
        """Score the run on another study's labelled cells (``evaluate.py query.path=...``): the report as a dict,
        also written to ``<run>/evaluation/query/<name>/`` unless ``write=False``. ``kwargs``: ``label_map``,
        ``ontology_key``, ``layer``, ``input_is_log1p``, ``reference`` (an index dir), ..."""
        from scimilarity_lora.evaluation.query import evaluate_query, query_name, write_query_report

        report = evaluate_query(self.predictor, query, label_key, **kwargs)
        if write:
            write_query_report(self.path, report, name or (query_name(str(query)) if isinstance(query, (str, Path))
                                                            else "query"))
        return report

    def build_index(self, reference: "str | Path", out: str | Path, label_key: str = "cell_type",
                    **kwargs: Any) -> Path:
        """A reference index of this run's embedding (``python -m scimilarity_lora.inference.reference build``)."""
        from scimilarity_lora.inference.reference import build_index

        return build_index(self.path / "model", str(reference), out, label_key=label_key, **kwargs)

    @property
    def base_tag(self) -> str:
        """The BentoML tag its base gets in the store with ``export(adapter=True)``: serve that tag
        (``SCIMILARITY_LORA_MODEL=<it> bentoml serve``) to answer for every adapter of the base."""
        from scimilarity_lora.serving.export import base_tag

        return base_tag(self.metrics["base_model"]["sha256"])

    def export(self, adapter: bool = False, name: str | None = None) -> str:
        """Into the BentoML model store (as ``serving.export``): the merged model, or with ``adapter=True`` the
        adapter with its base stored once (under :attr:`base_tag`). Returns the model's tag."""
        from scimilarity_lora.serving.export import DEFAULT_NAME, export_adapter, export_to_bentoml

        if adapter:
            return export_adapter(self.path, name or self.path.name.replace("-", "_"))[0]
        return export_to_bentoml(self.path, name or DEFAULT_NAME)
