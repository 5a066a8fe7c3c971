"""Hydra instantiates a sweeper only from a module of the ``hydra_plugins`` namespace package (it
scans that package at start-up), so ablate's coordinate-descent sweeper is named here. The code is
in ablate/descent.py; its config (``hydra/sweeper=coordinate_descent``) is registered by
ablate.compose.register.
This directory has no __init__.py on purpose: ``hydra_plugins`` is a namespace package shared with
the installed Hydra plugins."""
from ablate import descent


class CoordinateDescentSweeper(descent.CoordinateDescentSweeper):
    __doc__ = descent.CoordinateDescentSweeper.__doc__
