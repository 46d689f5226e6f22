"""Reproduction as a feature: every published setting of every registered method, run end to end against
its paper's number (``raydd reproduce``), with a results ledger kept in the repository."""
from .run import ReproResult, append_ledger, default_ledger, list_settings, parse_budget, read_ledger, reproduce
from .settings import SCALES, PublishedSetting, ReproScale, get_scale, get_setting, published_settings

__all__ = ["SCALES", "PublishedSetting", "ReproResult", "ReproScale", "append_ledger", "default_ledger",
           "get_scale", "get_setting", "list_settings", "parse_budget", "published_settings", "read_ledger",
           "reproduce"]
