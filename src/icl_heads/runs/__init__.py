"""Run folders: :mod:`.layout` names every folder and file of a ``reproduce`` run."""
