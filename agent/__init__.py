"""iobridge: learned I/O admission and prefetch policies for stock Linux."""

__version__ = "0.1.0"
