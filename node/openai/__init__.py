"""The OpenAI-compatible API (`/v1/*`): request shapes and their translation to llama.cpp (pure), the
llama.cpp driver, and the routes. Every error leaves in OpenAI's shape."""
