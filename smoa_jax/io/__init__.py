"""Files: atomic writes, the adapter file formats (portable, the authors', PEFT) and the orbax
training state."""
