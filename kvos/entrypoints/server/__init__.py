"""`kvos serve`: an OpenAI-compatible HTTP server over one engine.

FastAPI handles routing; the engine runs behind the `EngineClient` protocol,
so every client's requests join the same running batch. The handlers only
translate: HTTP body -> validated request -> token ids and SamplingParams ->
engine -> OpenAI response or Server-Sent Events. Anything a client can get
wrong is answered with a 4xx and OpenAI's error body; a client that goes away
has its request aborted, which frees its KV memory at once.

    app.py          routes, error bodies, lifespan; uvicorn and signals (run_server)
    openapi.py      the schema at /openapi.json
    plumbing.py     API key, body reading, engine errors, a call's engine requests (Job)
    streaming.py    Server-Sent Events and the deltas they carry
    completions.py  POST /v1/completions
    chat.py         POST /v1/chat/completions

The wire format itself (request validation, response shapes) lives in
`kvos.entrypoints.openai_protocol`.
"""

from kvos.entrypoints.server.app import build_app, run_server

__all__ = ["build_app", "run_server"]
