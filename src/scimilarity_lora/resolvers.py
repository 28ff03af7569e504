"""OmegaConf resolvers used by conf/ (registered by the entry points before Hydra composes the config)."""

from omegaconf import OmegaConf


def sweep_group() -> str:
    """One name for every job of a multirun (its sweep dir); a single run is its own group (its run dir)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    return str(hc.sweep.dir if hc.mode == RunMode.MULTIRUN else hc.run.dir)


def register() -> None:
    if not OmegaConf.has_resolver("sweep_group"):
        OmegaConf.register_new_resolver("sweep_group", sweep_group)
