"""Profiles measured on the target machine, and the cost model fitted from them."""

from deluceva.profiles.cost_model import CostModel, validate
from deluceva.profiles.measure import measure_profile
from deluceva.profiles.profile import DEFAULT_PERCENTAGES, Profile, load_profile, machine_fingerprint

__all__ = ["CostModel", "DEFAULT_PERCENTAGES", "Profile", "load_profile", "machine_fingerprint",
           "measure_profile", "validate"]
