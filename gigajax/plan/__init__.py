"""Planning: predicted memory (`memory.py`) and communication (`comm.py`) of a config under a
layout, with XLA's compiled figure (`planner.py`); every layout ranked (`advise.py`); layouts
written as one line (`layouts.py`) and checked against one device (`equivalence.py`)."""
