"""aigc-ray: train, tune, evaluate and serve image generators on Ray."""

__version__ = "0.1.0"
