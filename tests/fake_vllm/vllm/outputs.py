"""`vllm.outputs`: one `RequestOutput` per prompt, its `outputs` one `CompletionOutput` per sample."""

from dataclasses import dataclass
from typing import Optional, Union


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list
    cumulative_logprob: Optional[float]
    logprobs: Optional[list]
    finish_reason: Optional[str] = None  # "stop" | "length" | "abort"
    stop_reason: Union[int, str, None] = None  # the stop token id or stop string; None for EOS or length


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list
    outputs: list
    finished: bool
