"""SD 1.x/2.x UNet: diffusers ``UNet2DConditionModel`` -> ``models.unet`` (identity key map)."""

from streamflow_jax.models.unet import UNetConfig

CLASS_NAME = "UNet2DConditionModel"
CONFIG_CLS = UNetConfig
# Every other field diffusers writes, with the only value implemented (its default): the
# SDXL/Kandinsky/ControlNet-era options that SD 1.x/2.x checkpoints leave unset.
IGNORABLE: dict = {
    "center_input_sample": False, "only_cross_attention": False, "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "dual_cross_attention": False,
    "class_embed_type": None, "addition_embed_type": None, "addition_time_embed_dim": None,
    "num_class_embeds": None, "resnet_time_scale_shift": "default", "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional", "time_embedding_dim": None,
    "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "projection_class_embeddings_input_dim": None, "attention_type": "default",
    "class_embeddings_concat": False, "mid_block_only_cross_attention": None, "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
}


def rename(key: str) -> str:
    return key
