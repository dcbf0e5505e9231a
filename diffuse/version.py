"""The package's version: pyproject.toml reads it (one place), `diffuse --version` prints it where pip has not installed
the distribution."""

__version__ = "0.1.0"
