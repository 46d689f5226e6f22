"""Condensation methods: one interface (``CondensationMethod``), one registry, one result type.

>>> from raydd.methods import get_method, make_config
>>> cfg = make_config("mtt", "digits", ipc=2, syn_steps=10, max_start_epoch=4)
>>> method = get_method("mtt")(cfg, train, store, seed=0)
"""
from .base import (
    METHODS,
    CondensationMethod,
    MethodConfig,
    check_ipc,
    get_method,
    load_checkpoint,
    make_config,
    register_method,
    save_checkpoint,
)
from .synthetic import SyntheticSet, load_synthetic
# Importing a method module registers it.
from .mtt import MTT, MTTConfig  # noqa: E402
from .datm import DATM, DATMConfig  # noqa: E402
from .datm_clr import DATMCLR, DATMCLRConfig  # noqa: E402
from .dm import DM, DMConfig  # noqa: E402
from .coreset import HerdingCoreset, KCenterCoreset, RandomCoreset  # noqa: E402
from .dance import DANCE, DANCEConfig  # noqa: E402
from .ptlm import PTLM, PTLMConfig  # noqa: E402
from .edc import EDC, EDCConfig  # noqa: E402
from .ssd import SSD, SSDConfig  # noqa: E402

__all__ = [
    "DANCE", "DANCEConfig", "DATM", "DATMCLR", "DATMCLRConfig", "DATMConfig", "DM", "DMConfig", "EDC", "EDCConfig",
    "HerdingCoreset", "KCenterCoreset", "PTLM", "PTLMConfig", "RandomCoreset", "SSD", "SSDConfig",
    "METHODS", "MTT", "MTTConfig", "CondensationMethod", "MethodConfig", "SyntheticSet", "check_ipc", "get_method",
    "load_checkpoint", "load_synthetic", "make_config", "register_method", "save_checkpoint",
]
