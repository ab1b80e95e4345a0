"""Profiles: every operator's dense and delta times measured on the target machine, across
filtering percentages (`measure_profile`), saved as JSON (`Profile`). The cost model that reads
them is `deluceva.planner.cost_model`."""

from deluceva.profiles.measure import measure_profile
from deluceva.profiles.profile import DEFAULT_PERCENTAGES, Profile, load_profile

__all__ = ["DEFAULT_PERCENTAGES", "Profile", "load_profile", "measure_profile"]
