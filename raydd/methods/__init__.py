"""Condensation methods: one interface (``CondensationMethod``), one registry, one result type.

>>> from raydd.methods import get_method, make_config
>>> cfg = make_config("mtt", "digits", ipc=2, syn_steps=10, max_start_epoch=4)
>>> method = get_method("mtt")(cfg, train, store, seed=0)

Importing a method module registers it; the imports below are the registry (their order is the
order of every table: baselines, trajectory matching, distribution and statistics matching).
A new method is one module plus one import line here (docs/ADDING_A_METHOD.md).
"""
from .base import (
    METHODS,
    CondensationMethod,
    MethodConfig,
    Scale,
    check_ipc,
    get_method,
    load_checkpoint,
    make_config,
    register_method,
    save_checkpoint,
)
from .inputs import StoreInputs, TrajectoryNeed, farm_command, farm_commands
from .synthetic import SyntheticSet, load_synthetic

from .coreset import HerdingCoreset, KCenterCoreset, RandomCoreset  # noqa: E402
from .mtt import MTT, MTTConfig  # noqa: E402
from .datm import DATM, DATMConfig  # noqa: E402
from .datm_clr import DATMCLR, DATMCLRConfig  # noqa: E402
from .pad import PAD, PADConfig  # noqa: E402
from .ssd import SSD, SSDConfig  # noqa: E402
from .dm import DM, DMConfig  # noqa: E402
from .dance import DANCE, DANCEConfig  # noqa: E402
from .ptlm import PTLM, PTLMConfig  # noqa: E402
from .ncfm import NCFM, NCFMConfig  # noqa: E402
from .edc import EDC, EDCConfig  # noqa: E402

__all__ = [
    "DANCE", "DANCEConfig", "DATM", "DATMCLR", "DATMCLRConfig", "DATMConfig", "DM", "DMConfig", "EDC", "EDCConfig",
    "HerdingCoreset", "KCenterCoreset", "NCFM", "NCFMConfig", "PAD", "PADConfig", "PTLM", "PTLMConfig", "RandomCoreset", "SSD", "SSDConfig",
    "METHODS", "MTT", "MTTConfig", "CondensationMethod", "MethodConfig", "Scale", "StoreInputs", "SyntheticSet",
    "TrajectoryNeed", "check_ipc", "farm_command", "farm_commands", "get_method", "load_checkpoint", "load_synthetic",
    "make_config", "register_method", "save_checkpoint",
]
