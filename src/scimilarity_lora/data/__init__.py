"""Data sources for training: AnnData files and CELLxGENE Census streaming, their splits and local SOMA stores."""
