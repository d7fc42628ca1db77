"""pneumobatch: batch chest X-ray classification for nightly PACS exports."""

__version__ = "0.1.0"
