"""Sandkasten: self-hosted, event-sourced Linux sandboxes for AI coding agents."""

__version__ = "0.1.0"
