"""mirror: a pull-through caching mirror for Docker Hub."""

__version__ = "0.1.0"
