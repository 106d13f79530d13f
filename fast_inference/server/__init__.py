"""The OpenAI-compatible server: http (asyncio + h11), routes, generation, embeddings, protocol (requests),
response_builder (responses), sse, tokenizers, metrics, errors, serve."""
