"""fastvae's version, in its own module so that modules needing it do not import the package (no loop)."""

__version__ = "0.1.0"
