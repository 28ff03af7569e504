"""The BentoML service and export into the BentoML model store. Built on :mod:`scimilarity_lora.inference`."""
