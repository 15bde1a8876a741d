"""The training loop, its tasks and its data (JSONL reading, instruction data and chat templates,
tokenization, packing, batches)."""
