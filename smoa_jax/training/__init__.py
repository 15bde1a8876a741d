"""The training loop, its tasks and its data (JSONL reading, tokenization, batches)."""
