"""The OpenAI-compatible server: http (asyncio + h11 transport), protocol, routes, sse, metrics, errors, serve."""
