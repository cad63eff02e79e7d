"""Per-artifact evaluation: perplexity, KL-divergence and top-1 agreement vs a reference, and a chat smoke test."""
