"""phibuild: quantizing Microsoft's Phi models as a reproducible, incremental pydoit build."""

__version__ = "0.1.0"
