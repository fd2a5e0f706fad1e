"""edgesplit: a runtime for edge-cloud split computing.

Planes: ``build`` (torch: zoo, split families, training, export), ``edge`` (the deploy agent, no
torch), ``server`` (the daemon). Contracts: the bundle (:mod:`edgesplit.bundle`) and the wire
protocol (:mod:`edgesplit.wire`).
"""

__version__ = "0.1.0"
