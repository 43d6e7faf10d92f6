"""Built-in model-family adapters (installed as ``sar_adapters``).

Each family is one folder with the same file roles: ``__init__.py`` (the plugin),
``config.py``, ``tokenizer.py``, ``backbone.py``, ``checkpoint.py``, ``adapter.py``.
``common/`` holds building blocks several families share; families never import each other.
"""
