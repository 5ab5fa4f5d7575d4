"""Data that ships offline with installed packages, shaped for personalization stories."""

from .digits import DigitsSplits, UserStyle, load_digits_splits

__all__ = ["DigitsSplits", "UserStyle", "load_digits_splits"]
