"""Fine-tuning jobs, events, checkpoints, adapters (the model registry). Issue 7."""
