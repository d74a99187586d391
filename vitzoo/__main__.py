"""``python -m vitzoo`` (and ``accelerate launch -m vitzoo``)."""

from vitzoo.cli import main

raise SystemExit(main())
