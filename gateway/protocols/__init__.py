"""Protocol adapters: how each wire format marks content, translates, and renders errors.

    endpoint (/v1/...)   stream rules            error shape        upstream kinds
    chat/completions     openai.OpenAIStream     OpenAI envelope    openai; anthropic, translated
    completions          openai.OpenAIStream     OpenAI envelope    openai
    embeddings           (whole answers)         OpenAI envelope    openai
    responses            responses.*Stream       OpenAI envelope    openai
    messages             anthropic.*Stream       Anthropic's        anthropic
    messages/count_tokens (whole answers)        Anthropic's        anthropic

`api.Api` binds an endpoint to its rules; `api.Api.translation` picks, per upstream, how a
request gets there (`Passthrough` or `ChatViaMessages`). Everything here is pure: the relay
(`gateway.relay`, `gateway.upstream_reader`) does the I/O and asks these modules what it saw.
"""
