"""``python -m vitcourse ...`` runs the ``vitcourse`` command (see :mod:`vitcourse.cli`)."""

from vitcourse.cli import main

raise SystemExit(main())
