# Written by lm2 (lm2cli/hf/) beside every InternLM2 model folder it saves, so that
# `AutoConfig.from_pretrained(folder, trust_remote_code=True)` reads the folder without lm2 installed.
# The keys and their meaning are those of the released InternLM2 models' `configuration_internlm2.py`.
"""InternLM2 model configuration (transformers `trust_remote_code`)."""

try:  # transformers >= 5
    from transformers import PreTrainedConfig
except ImportError:  # transformers 4.x
    from transformers import PretrainedConfig as PreTrainedConfig


class InternLM2Config(PreTrainedConfig):
    """Sizes, RoPE and special ids of an InternLM2 model.

    `rope_scaling` is None or `{"type": "linear" | "dynamic", "factor": float >= 1}`, as in the released
    models. Dynamic NTK raises the RoPE base once a call's length passes `max_position_embeddings`.
    """

    model_type = "internlm2"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]  # noqa: RUF012 (transformers API)
    # transformers 5 turns `rope_scaling` into a property over `rope_parameters` and rewrites it; InternLM2
    # keeps the released {type, factor} form as a plain attribute.
    rope_scaling = None

    def __init__(
        self,
        vocab_size=103168,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=None,
        hidden_act="silu",
        max_position_embeddings=2048,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        use_cache=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        bias=False,
        rope_theta=10000.0,
        rope_scaling=None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.bias = bias
        self.rope_theta = rope_theta
        kwargs.pop("rope_parameters", None)  # written by transformers 5's save_pretrained; rope_scaling is the source
        self.rope_scaling = _validated_rope_scaling(rope_scaling)
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        if self.bias:
            raise ValueError("this InternLM2 implementation has no bias terms (config bias must be false)")
        if self.hidden_act != "silu":
            raise ValueError(f"InternLM2 uses SwiGLU (hidden_act silu), got {self.hidden_act!r}")


def _validated_rope_scaling(rope_scaling):
    if rope_scaling is None:
        return None
    if not isinstance(rope_scaling, dict) or set(rope_scaling) != {"type", "factor"}:
        raise ValueError(f"rope_scaling must be a dict with two fields, type and factor, got {rope_scaling}")
    kind, factor = rope_scaling["type"], rope_scaling["factor"]
    if kind not in ("linear", "dynamic"):
        raise ValueError(f"rope_scaling type must be linear or dynamic, got {kind!r}")
    if not isinstance(factor, (int, float)) or factor < 1.0:
        raise ValueError(f"rope_scaling factor must be a number >= 1, got {factor!r}")
    return {"type": kind, "factor": float(factor)}
