"""graphc serve: compiled models behind an HTTP inference server."""
