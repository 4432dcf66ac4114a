"""recoup: restore the accuracy that compression took from a large language model.

The code lives in three sub-packages mapped from the repository's top level:
``recoup.orchestrator`` (config, stage DAG, run directory, CLI), ``recoup.stages``
(one module per pipeline stage, math in pure functions beside it) and ``recoup.cluster``
(everything that touches Ray).
"""

__version__ = "0.1.0"
