"""Evaluation: batched generation over question files and scorers (the evaluation issue adds the seven benchmarks)."""
