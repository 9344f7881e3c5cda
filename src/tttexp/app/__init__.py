"""Entry points and their config: train, eval, preflight, schemas, sweep summary."""
