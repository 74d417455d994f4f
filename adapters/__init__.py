"""Adapter variants: one module per method, each registered with ``@register``.

Every module in this package is imported here, so a new variant is one new file; its class is
then available as ``adapters.<Name>``.

Note: AdapterHub's library is also imported as ``adapters``; the two cannot share an environment.
"""

import importlib
import pkgutil

from .base import REGISTRY, SiteInit, Variant, register

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

globals().update(REGISTRY)
__all__ = ["Variant", "SiteInit", "register", "REGISTRY", *sorted(REGISTRY)]
