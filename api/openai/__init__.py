"""What OpenAI's Python client talks to: files, fine-tuning jobs over Tessera's runs, and inference with what they
registered. Routes under /v1, answers and errors in OpenAI's object shapes."""
