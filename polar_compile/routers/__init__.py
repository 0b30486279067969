"""Routers: modules (``modules.py``), calibration (``collect.py`` -> ``train.py``, driven by ``calibrate.py``),
safetensors files (``io.py``) and the ``polar-compile calibrate`` command (``cli.py``).

Public names are reached through ``polar_compile`` (``calibrate``, ``PolarRouters``, ``save_routers``,
``load_routers``) or their modules; this package imports nothing on its own.
"""
