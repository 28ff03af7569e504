"""Pure-torch model code: SCimilarity's encoder, its sparse first layer, adapters, the classifier (encoder + head)
and SCimilarity model-folder I/O. Imports no Lightning, no AnnData: training, inference and serving build on it."""
