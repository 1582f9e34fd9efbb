"""Scorers of the standard benchmarks: pure functions over question, answer and annotation files,
reproducing the official tools (rules in eval-scoring.md; LLaVA/Mipha variants by default)."""
