"""HTTP clients of an abliserve server: the library, the ``ab`` and ``eval`` commands, plots."""

DEFAULT_SERVER = "http://127.0.0.1:8000"  # where the client library and the CLIs look first
