"""The layered-row engine: many variants of one input, run as rows joining a shared base run.

A map of the package:

- ``rows.py``: ``Row`` (joins at a layer and a start position) and its edits, ``SitePatch`` and
  ``ReceiverInput``;
- ``blocks.py``: the captured model as prelude, block and head programs (a derived item of the model);
- ``base.py``: the base run, block by block, keeping residuals, keys and values;
- ``schedule.py``: the cost model and the schedule (packed chunks, or padded chunks in waves);
- ``layouts.py``: where each row's tokens are in a call (padded or packed) and how its edits land;
- ``readout.py``: metric values from final hidden states, computing only what the metric reads;
- ``engine.py``: ``RowEngine``, which runs a schedule block by block.

Activation sweeps (``engine/sweep.py``), path patching and edge sweeps (``fxlens/circuits``) are rows.
"""

from .base import Base
from .blocks import Blocks, BlockError
from .engine import RowEngine
from .readout import MetricError, Readout
from .rows import ReceiverInput, Row, RowError, SitePatch

__all__ = ["Base", "Blocks", "BlockError", "RowEngine", "Readout", "MetricError", "Row", "RowError", "SitePatch", "ReceiverInput"]
