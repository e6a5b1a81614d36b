"""``python -m diffwidget.cli`` (what ``torchrun -m diffwidget.cli run …`` starts)."""

from diffwidget.cli import main

raise SystemExit(main())
