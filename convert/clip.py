"""CLIP text encoders: transformers ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` -> ``models.clip``.

transformers writes ``config.json`` with ``architectures`` instead of ``_class_name``, and
(older versions) many generic ``PretrainedConfig`` fields for generation and training; those
do not change the encoder's forward pass and are accepted with any value (``ANY_VALUE``).
"""

from streamflow_jax.models.clip import CLIPTextConfig

CLASS_NAME = "CLIPTextModel"
CLASS_NAMES = ("CLIPTextModel", "CLIPTextModelWithProjection")
CONFIG_CLS = CLIPTextConfig
WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
IGNORABLE: dict = {}
ANY_VALUE = frozenset({
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "attention_dropout", "dropout",
    "initializer_range", "initializer_factor", "pad_token_id", "bos_token_id", "return_dict", "output_hidden_states",
    "output_attentions", "torchscript", "use_bfloat16", "tf_legacy_loss", "pruned_heads", "tie_word_embeddings",
    "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "cross_attention_hidden_size",
    "add_cross_attention", "tie_encoder_decoder", "max_length", "min_length", "do_sample", "early_stopping",
    "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "finetuning_task", "id2label", "label2id", "tokenizer_class", "prefix",
    "sep_token_id", "decoder_start_token_id", "task_specific_params", "problem_type", "gradient_checkpointing",
})


def prepare_config(raw: dict) -> dict:
    """transformers -> our config: the projection is decided by the architecture."""
    arch = (raw.get("architectures") or ["CLIPTextModel"])[0]
    return {**raw, "with_projection": arch == "CLIPTextModelWithProjection"}


def rename(key: str) -> str:
    """transformers 5 saves ``CLIPTextModel`` without the ``text_model.`` prefix; older ones with it."""
    if key.startswith("text_model.") or key.startswith("text_projection."):
        return key
    return "text_model." + key
