"""osvm: run blockchain infrastructure as isolated components on one host."""

__version__ = "0.1.0"
