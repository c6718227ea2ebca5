"""From a user's training file to packed, tokenized rows: formats, validation, tokenization, packing, caching."""
