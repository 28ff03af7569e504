"""OmegaConf resolvers used by conf/ (registered by the entry points before Hydra composes the config)."""

from pathlib import Path

from omegaconf import OmegaConf


def sweep_group() -> str:
    """One short, readable name for every job of a multirun, e.g. ``train-multirun-2026-11-24_10-42-07``; a single
    run is its own group (``train-2026-11-24_10-42-07``). Built from the job name and the output directory's last
    two parts (Hydra's date/time layout), not the directory's absolute path."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    folder = Path(str(hc.sweep.dir if multirun else hc.run.dir))
    stamp = "_".join(folder.parts[-2:]) if len(folder.parts) >= 2 else folder.name
    return f"{hc.job.name}-{'multirun-' if multirun else ''}{stamp}"


def tags_with(tags, *extra: str) -> list[str]:
    """The run's ``tags`` plus ``extra`` ones (e.g. the fine-tuning mode), without duplicates."""
    out = [str(t) for t in (tags or [])]
    return out + [str(e) for e in extra if str(e) not in out]


def register() -> None:
    if not OmegaConf.has_resolver("sweep_group"):
        OmegaConf.register_new_resolver("sweep_group", sweep_group)
    if not OmegaConf.has_resolver("tags_with"):
        OmegaConf.register_new_resolver("tags_with", tags_with)
