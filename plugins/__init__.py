"""Built-in non-model plugins (installed as ``sar_plugins``): datasets, metrics, loggers, rollouts, losses."""
