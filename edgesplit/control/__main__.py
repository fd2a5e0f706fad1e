"""``python -m edgesplit.control TRACE MANIFEST --fallback-ms MS ...``: replay a trace for the
standard policies (see :func:`edgesplit.control.simulator.main`)."""

from .simulator import main

raise SystemExit(main())
