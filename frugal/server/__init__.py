"""The OpenAI-compatible server: `frugal serve`, or `create_app(AsyncEngine(...), ServerConfig(...))`."""
