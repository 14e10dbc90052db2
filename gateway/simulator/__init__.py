"""A fault-injecting upstream speaking OpenAI's and Anthropic's APIs: the test double for
gateways and their clients.

Endpoints (relative, so the app also works mounted under a prefix such as `/sim-upstream`):

    POST /v1/chat/completions  POST /v1/completions   OpenAI, stream true or false
    POST /v1/responses                                 OpenAI Responses, stream true or false
    POST /v1/messages                                  Anthropic Messages, stream true or false
    POST /v1/messages/count_tokens                     Anthropic: {"input_tokens": N}
    POST /v1/embeddings        GET  /v1/models         OpenAI
    GET  /sim/stats            POST /sim/reset

Answers are shaped like the real APIs', so the `openai` and `anthropic` SDKs parse them. Text is
`tok0 tok1 ...`; tool call i (knob `tool-calls`) is `tool_<i>` with the JSON arguments
`{"call": i, "words": "tok0 tok1 ..."}`, streamed in `tokens` pieces. Bad input is a 400 in the
API's own error shape. Per API:

- Chat and completions: a stream is `data:` chunks, OpenAI's role-only chunk first (chat:
  `{"role": "assistant", "content": "", "refusal": null}`), then a `finish_reason: "stop"`
  chunk, the usage chunk if `stream_options.include_usage` is set, and `data: [DONE]`. `n`
  gives that many choices alike (one chunk per choice); `logprobs` (chat: `true`, with
  `"refusal": null` as OpenAI's; completions: an integer) gives every token -0.5; completions'
  `echo: true` puts the prompt (a string) before the text, not streaming only, as a stream
  cannot carry it. Embeddings are deterministic 8-dimensional vectors (`encoding_format` float
  or base64).
- Responses: `model` and `input` (a string or a non-empty list of items) are required. The answer
  is a Response object with one `message` item, or one `function_call` item per tool call
  (`fc_<i>`, `call_<i>`). A stream is `event: <type>` events with increasing `sequence_number`:
  response.created, response.in_progress, per item response.output_item.added (text also
  response.content_part.added), its deltas (response.output_text.delta or
  response.function_call_arguments.delta), its done events, then response.completed; no [DONE].
- Messages: checked as Anthropic checks, so a gateway's translation into it is checked too: the
  `anthropic-version` header; `model`, `max_tokens` >= 1 and non-empty `messages` required;
  roles, content block types, `system`, `tools`, `tool_choice`, `stop_sequences` and
  `temperature` (0..1) checked; a `tool_result` must answer a `tool_use` of an earlier
  assistant message; an unknown field is "<field>: Extra inputs are not permitted". Text is cut
  at `max_tokens` (stop_reason `max_tokens`, else `end_turn`); tool calls are `tool_use` blocks
  `toolu_<i>` (stop_reason `tool_use`; never cut). A stream is `event: <type>` events:
  message_start, per block content_block_start (the first followed by a `ping`), its deltas
  (text_delta or input_json_delta) and content_block_stop, then message_delta and message_stop.
  Answers carry Anthropic's `request-id` and `anthropic-ratelimit-*` headers, not OpenAI's.

A stream's *preamble* is what it sends at once, before the first token: the role-only chunk
(chat; nothing for completions), response.created to response.content_part.added (responses),
message_start, the first content_block_start and a ping (messages).

Faults are chosen per request by `x-sim-<knob>` headers or by a model-name suffix
`<model>@<knob>=<value>,<knob>=<value>` (e.g. `sim@ttft-ms=500,tokens=3`, `demo@hang=headers`).
A header wins over the same knob in the suffix; the echoed `model` is the string as received.
An unknown knob or a bad value is a 400 naming the knob. The knobs work alike on every POST
/v1 endpoint (those about tokens or streams where there are some).

    knob          effect (default: off)
    latency-ms    sleep before the response headers, in every mode (default 0)
    ttft-ms       sleep before the first token (default 0): streaming, after the headers and
                  the preamble; not streaming, before the headers, as a model server
                  generates the whole answer before it sends any of it
    gap-ms        sleep between tokens (default 0), in both modes, the same way
    tokens        completion tokens to produce (default 8; messages: at most `max_tokens`)
    tool-calls    answer with this many tool calls instead of text (chat, responses, messages)
    hang          `headers`: never send the headers; `body`: send the 200 headers, then nothing;
                  `after-N`: stream the preamble and N tokens, then nothing (`after-0` is
                  `body`; not streaming: as `body`). A hang lasts until the client goes away,
                  or 600 s and then the answer goes on
    keepalive-ms  streaming: while hanging after the headers or waiting for a token, send a
                  keep-alive this often: the SSE comment `: keep-alive`, or on messages
                  Anthropic's `event: ping` (`data: {"type": "ping"}`)
    status        after `latency-ms`, answer with this status (400-599) in the API's error
                  shape: OpenAI's envelope with code `sim_error`; Anthropic's
                  `{"type": "error", "error": {"type": ...}}`, typed by status (400
                  invalid_request_error, 401 authentication_error, 403 permission_error, 404
                  not_found_error, 413 request_too_large, 429 rate_limit_error, 503 and 529
                  overloaded_error, other 5xx api_error, other 4xx invalid_request_error)
    retry-after   with `status`: the value of a `Retry-After` header
    flaky         with `status`: only the first N requests for this exact model string fail
                  with it; later ones are answered normally (a brown-out that recovers)
    malformed     `json`: a non-streaming 200 whose body is `{"id": "broken`; `sse`: a stream
                  whose first event is `data: {not json}` (responses: `event: response.created`,
                  messages: `event: message_start` before it); each is ignored in the other mode
    error-after   streaming: send the preamble and N tokens, then the API's in-stream error
                  event, and end the stream cleanly. Chat and completions: `data: {"error":
                  {..., "type": "server_error", "code": "sim_error"}}` and no [DONE];
                  responses: `event: error` with code `server_error`; messages: `event:
                  error` with an `overloaded_error`. Not streaming, the answer is that error:
                  500 in the API's shape (messages: 529 `overloaded_error`)
    error-body    how `status` and `error-after` errors look: `flat`, vLLM's flat `{"object":
                  "error", "message": ..., "type": "InternalServerError", "param": null,
                  "code": <status>}` (chat and completions' in-stream error too); `text`, a
                  plain-text reason phrase (`Internal Server Error`), as a crashed server or a
                  proxy answers (error statuses only)
    include-usage `ignore`: chat and completions streams carry no usage even when
                  `stream_options.include_usage` asks, as llama.cpp's
    extra-keys    `true`: chat and completions carry the keys llama.cpp and vLLM add to
                  OpenAI's: `timings` at the top (the last chunk; the whole answer),
                  `stop_reason` on each choice (null until the finish chunk, then 2), and
                  (chat text) `reasoning_content`, a `why ` per token
    context-limit chat and completions: a prompt of more tokens than this (words of its
                  strings) is refused as llama.cpp refuses one past its context: not
                  streaming, 400 `context_length_exceeded` (OpenAI's envelope); streaming, 200
                  and only an SSE `error:` line with that envelope, which SSE readers ignore:
                  an empty stream
    close         `true`: answer with `Connection: close`, so the server closes the connection
                  after the response (the client must not reuse it)
    reset         `after-headers`: send the 200 headers, then drop the connection; `after-N`:
                  stream N tokens, then drop it (not streaming: as `after-headers`). The app
                  returns with the response unfinished, so the server closes the connection
                  (uvicorn logs one error line) and the client sees a truncated body: httpx
                  raises `RemoteProtocolError` ("peer closed connection ...").
    (every OpenAI answer carries OpenAI's `openai-organization`, `openai-processing-ms`,
    `x-ratelimit-*` and a `set-cookie`, as OpenAI's do)

What the SDKs make of `error-after`: the `openai` SDK raises `openai.APIError` on the chat
error chunk; on the Responses `error` event it yields a `ResponseErrorEvent` and ends without
raising (its `responses.stream()` helper then raises `RuntimeError` for the missing
response.completed); the `anthropic` SDK raises `anthropic.APIStatusError` whose `status_code`
is the stream's 200 and whose `body` is the event.

`GET /sim/stats` returns, over all POST /v1 endpoints, `open` (requests in progress), `total`
(requests received), `completed` (answered in full, error statuses included), `cancelled` (the
client went away first, in any phase; noticed within milliseconds), `reset` (dropped by the
`reset` knob), `peak_open` (the most requests open at once), `connections` (distinct client
sockets seen, by address and port: 1 for many requests means the client reused its
connection), and `last_headers` (lower-cased) and `last_body` (parsed JSON, or null) of the last
request. `POST /sim/reset` zeroes all of it but `open`.

Code: `faults.py` parses the knobs; `content.py` makes the tokens and tool calls every API
answers; each API is a module (`openai_api.py`, `responses.py`, `messages.py` with
`messages_request.py`) whose answers fill in `answer.StreamedAnswer` (preamble, token, closing
and error events); `driver.py` sends any of them with the faults; `asgi.py` is the plumbing;
`app.py` routes and counts, in `stats.py`.
"""

from gateway.simulator.app import create_simulator_app
from gateway.simulator.faults import FaultError, Faults, parse_faults
from gateway.simulator.stats import SimulatorStats

__all__ = ["FaultError", "Faults", "SimulatorStats", "create_simulator_app", "parse_faults"]
