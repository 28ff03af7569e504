"""OmegaConf resolvers used by conf/ (registered by the entry points before Hydra composes the config)."""

from omegaconf import OmegaConf


def sweep_group() -> str:
    """One name for every job of a multirun (its sweep dir); a single run is its own group (its run dir)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    return str(hc.sweep.dir if hc.mode == RunMode.MULTIRUN else hc.run.dir)


def tags_with(tags, *extra: str) -> list[str]:
    """The run's ``tags`` plus ``extra`` ones (e.g. the fine-tuning mode), without duplicates."""
    out = [str(t) for t in (tags or [])]
    return out + [str(e) for e in extra if str(e) not in out]


def register() -> None:
    if not OmegaConf.has_resolver("sweep_group"):
        OmegaConf.register_new_resolver("sweep_group", sweep_group)
    if not OmegaConf.has_resolver("tags_with"):
        OmegaConf.register_new_resolver("tags_with", tags_with)
