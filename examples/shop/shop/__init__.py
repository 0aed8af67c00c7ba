"""A small web-shop backend: the showcase application of pytest-pgtemplate."""
