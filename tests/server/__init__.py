"""Server tests: the OpenAI API over HTTP against a live in-process server with a tiny model."""
