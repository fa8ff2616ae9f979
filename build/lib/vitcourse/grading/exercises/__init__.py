"""Public exercise specs, one module per chapter (``ch01.py`` ...): see :mod:`vitcourse.grading`."""
