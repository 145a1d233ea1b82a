"""/v1/chat/completions, /v1/models, batches; hosts the engine. Issue 7."""
