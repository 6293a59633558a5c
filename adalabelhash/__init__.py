"""AdaLabelHash: learned binary hash codes with adaptable label codewords."""

__version__ = "0.1.0"
