"""Talking to a trained model: the command-line chat (`python -m mipha_lab.serve.cli`)."""
