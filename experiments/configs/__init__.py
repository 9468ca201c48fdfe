"""Configurations shared by the experiment scripts (``experiments/*.py``)."""
