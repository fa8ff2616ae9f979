"""The corpus holds hostile notebooks (fork bombs, infinite loops): never let pytest or nbval run them."""

collect_ignore_glob = ["*.ipynb", "*.py"]
