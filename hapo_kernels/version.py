"""The one version string of hapo-kernels (setup and both packages read it)."""
__version__ = "0.2.0"
