"""Offline evaluation in the official Argoverse 2 scene-flow format.

* :mod:`.predict`   ``zeroflow predict``: per-sweep flow files (AV2 layout), challenge archives.
* :mod:`.evaluate`  ``zeroflow eval``: scores a prediction folder/archive against a split's ground truth.
* :mod:`.metrics`   the official av2 0.3.6 three-way metrics in numpy (parity-tested against av2).
* :mod:`.bucketed`  the bucket-normalised EPE of the AV2 2024 challenge (Khatri et al., ECCV 2024).
* :mod:`.masks`     official mask archives, read lazily.
"""
