"""amoeba-profile: measure, tabulate and select shapes of shrinkable LLaMA models per device."""

__version__ = "0.1.0"
