"""The built-in plugin registering sar's own rollouts, losses, datasets, metrics and loggers."""
