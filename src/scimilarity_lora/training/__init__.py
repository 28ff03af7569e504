"""Training: the LightningModule around :class:`~scimilarity_lora.model.classifier.CellClassifier`, one run from a
Hydra config, callbacks, crash-safe checkpoint IO and OmegaConf resolvers."""
