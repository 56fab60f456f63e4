"""Run directories: resolved config, per-round metrics, model, summary."""
