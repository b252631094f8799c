"""Evaluation: perplexity, text metrics, side-by-side model comparison, blind A/B sheets, run reports.

Import the submodules directly (``tuneforge.evaluate.perplexity`` ...); this package imports nothing heavy.
"""
