"""Code both stages share: the store format, dtype helpers, user-facing errors."""
