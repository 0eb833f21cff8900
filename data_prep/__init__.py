"""Offline corpus preparation: raw text -> tokenised, memory-mappable pretraining corpus.

`mbert-prep` (`data_prep.prep:main`) is the command line; `data_prep.prep.prepare(PrepConfig(...))`
is the same thing from Python (the embedded default corpus is built through it). The package
itself imports only the light modules, so `python -m data_prep.prep` runs cleanly.
"""

from data_prep.config import PrepConfig, PrepError
from data_prep.split import available_splitters, get_splitter, register_splitter

__all__ = ["PrepConfig", "PrepError", "available_splitters", "get_splitter",
           "register_splitter"]
