"""Training: trainability policies, the engine (plain PyTorch or DeepSpeed), the loop and its metrics."""
