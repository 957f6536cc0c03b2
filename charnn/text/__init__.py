"""Reading text files and folders, the tokenizer, the encoded-corpus cache,
the split and the batchers."""
