"""Per-family tables: facts about HF module paths that dataflow alone cannot give.

Every family works without a table (sites come from ``graphs/``); a table adds TransformerLens'
naming choices and lets the tests check the dataflow analysis against known module paths.

Example::

    table_for(hf_model.config)      # ArchTable for GPT-2, Llama, ... or None for an unknown family
"""

from .bert import BERT
from .gemma import GEMMA, GEMMA2
from .gpt2 import GPT2
from .gptj import GPTJ
from .llama import LLAMA
from .neox import NEOX
from .opt import OPT
from .phi import PHI
from .table import ArchTable

TABLES = (GPT2, LLAMA, NEOX, GEMMA, GEMMA2, OPT, PHI, GPTJ, BERT)
_BY_TYPE = {t: table for table in TABLES for t in table.model_types}

__all__ = ["ArchTable", "TABLES", "table_for"]


def table_for(config) -> ArchTable | None:
    """The table for an HF config's ``model_type``, or None for a family without one."""
    return _BY_TYPE.get(getattr(config, "model_type", None))
