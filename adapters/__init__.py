"""Adapter variants: one module per method, each registered with ``@register``.

The contract (``Variant``, ``SiteInit``, ``register``) lives in ``surgery/variant.py``; importing this
package loads that module and ``surgery.errors``, not the engine. Every module in this package is imported here, so a new variant is one new file; its class is
then available as ``adapters.<Name>``.

Note: AdapterHub's library is also imported as ``adapters``; the two cannot share an environment.
"""

import importlib
import pkgutil

from surgery.variant import REGISTRY, SiteInit, Variant, register

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")

globals().update(REGISTRY)
__all__ = ["Variant", "SiteInit", "register", "REGISTRY", *sorted(REGISTRY)]
