"""edge-sdk: shared library for host tools and the device agent."""

__version__ = "0.1.0"
