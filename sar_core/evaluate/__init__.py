"""Measuring a model: generation (``generation``: loading an adapter, sampling images,
grids and folders), image sets as torch-fidelity reads them (``images``), what ``sar eval``
reads and makes before measuring (``inputs``), the metrics (``metrics``: FID, IS, KID,
precision / recall, class accuracy through torch-fidelity), the exposure-gap diagnostics
(``diagnostics``), per-scale difference maps (``difference_maps``) and pictures sized to be
read (``pictures``: labelled, upscaled sample grids; maps side by side).

May import: the contract modules, ``sar_core.sar`` (prefix reuse) and ``sar_core.data``.
Never ``train`` or ``study`` (``train`` imports ``evaluate`` for validation during training).
"""
