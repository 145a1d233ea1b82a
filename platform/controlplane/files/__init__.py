"""OpenAI-style Files API: upload, validate, encrypted storage. Issue 7."""
