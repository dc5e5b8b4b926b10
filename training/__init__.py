"""zeroflow_training: the offline pipeline (synthetic data, NSFP teacher, pseudo-labels, student, export).

Installed under the import name ``zeroflow_training`` (see setup.py).
"""
