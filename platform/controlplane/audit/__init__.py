"""Append-only audit log. Issue 7."""
