"""The web console (server-rendered pages). Issue 8."""
