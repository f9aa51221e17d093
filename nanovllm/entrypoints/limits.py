"""What one request may ask of a public server (each a flag of `nanovllm serve`), checked before the request
reaches the engine: over a limit is a 4xx whose message names the limit and its flag. (max_tokens is bounded by
max_model_len in server.make_requests; the waiting queue by AsyncEngine.submit; the time a request may take by
the engine loop.)"""

from dataclasses import dataclass

from nanovllm.entrypoints.protocol import APIError, SamplingFields, error_response


@dataclass
class ServerLimits:
    """What one request may ask (each a flag of `nanovllm serve`); max_tokens is bounded by max_model_len."""

    max_request_body_bytes: int = 4 * 2**20
    max_n: int = 16
    max_stop_strings: int = 16
    max_stop_string_length: int = 256
    max_waiting_requests: int | None = None  # sequences waiting for the batch; None: no limit (as vLLM)


def limit_body(app, max_bytes: int):
    """ASGI middleware: a body over max_bytes is a 413 before anything parses it, whether it says its length or
    not. The body is read here and handed on; later receives (a client hanging up) pass through."""

    async def guarded(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        too_large = error_response(
            413,
            f"the request body is larger than this server's limit of {max_bytes} bytes (--max-request-body-bytes)",
            code="request_too_large",
        )
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > max_bytes:
            return await too_large(scope, receive, send)
        chunks, size, message = [], 0, {"more_body": True}
        while message.get("more_body"):
            message = await receive()
            if message["type"] != "http.request":  # the client left before its body arrived
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > max_bytes:
                return await too_large(scope, receive, send)
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay():
            nonlocal body
            message, body = body or await receive(), None
            return message

        await app(scope, replay, send)

    return guarded


def check_limits(body: SamplingFields, limits: ServerLimits) -> None:
    if body.n > limits.max_n:
        raise APIError(
            400,
            f"n={body.n} is more than this server's limit of {limits.max_n} completions per prompt (--max-n)",
            param="n",
        )
    stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
    if len(stops) > limits.max_stop_strings:
        raise APIError(
            400,
            f"{len(stops)} stop strings are more than this server's limit of "
            f"{limits.max_stop_strings} (--max-stop-strings)",
            param="stop",
        )
    longest = max(stops, key=len, default="")
    if len(longest) > limits.max_stop_string_length:
        raise APIError(
            400,
            f"a stop string of {len(longest)} characters is longer than this server's limit of "
            f"{limits.max_stop_string_length} (--max-stop-string-length)",
            param="stop",
        )
