"""Split families, one subpackage each, found by :mod:`edgesplit.families.registry`.

A family subpackage's ``__init__`` only registers the family (torch-free): its config schema, the
bundle rules, and the module paths of its model, training steps and exporter, imported when used.
Adding a family is one new subpackage; nothing else names it. Nothing is imported here, so the
bundle contract can read the registry without pulling in any family's torch code.
"""
