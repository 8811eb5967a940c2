"""cpmgen: run CPM-1 to write lyrics and novels far past its 1024-token window."""

__version__ = "0.1.0"
