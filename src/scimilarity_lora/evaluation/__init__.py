"""Evaluation of finished runs: metrics (pure NumPy), the evaluate command, its report, plots and sweep summaries."""
