"""The ``sar`` command line (installed as ``sar_cli``)."""
