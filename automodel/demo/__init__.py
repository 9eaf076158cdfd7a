"""The offline demo: synthetic receipts and the tower reader that the quickstart prepares.

Not part of the training runtime: only the CLI's ``data make-receipts``, the examples'
``prepare:`` steps, tests and benchmarks import it.

- ``receipts.py``: ``make_receipts``, deterministic synthetic receipts in CORD-v2's layout;
- ``reader.py``: ``teach_tower_to_read``, a twin's vision tower and projector taught to read them.
"""
