"""`vllm.inputs.TokensPrompt`: a TypedDict, so `TokensPrompt(prompt_token_ids=[...])` is a plain dict."""

from typing import TypedDict


class TokensPrompt(TypedDict):
    prompt_token_ids: list
