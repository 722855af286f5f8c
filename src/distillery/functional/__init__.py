"""Pure tensor -> tensor maths of distillation: no state, no configuration, no I/O.

Conventions shared by every logit function are documented in :mod:`distillery.functional._rows`.
"""

from distillery.functional._fused import composed_gradients
from distillery.functional.attention import (
    attention_kl,
    attention_score_mse,
    self_relation_kl,
    value_relation_kl,
)
from distillery.functional.chunked import (
    chunked_cross_entropy_from_hidden,
    chunked_kd_from_hidden,
    should_chunk,
)
from distillery.functional.classification import cross_entropy
from distillery.functional.compression import magnitude_mask, sparsity_at
from distillery.functional.cross_tokenizer import span_likelihood_loss, uld_loss
from distillery.functional.data_free import (
    batch_norm_statistics,
    bn_feature_loss,
    image_l2,
    image_total_variation,
)
from distillery.functional.diffusion import (
    alpha_sigma,
    consistency_distillation_loss,
    consistency_skip_out,
    ddim_step,
    eps_from_v,
    karras_sigmas,
    progressive_distillation_loss,
    progressive_distillation_target,
    pseudo_huber,
    snr_truncated_weight,
    v_target,
    x_from_eps,
    x_from_v,
)
from distillery.functional.divergences import (
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    total_variation,
)
from distillery.functional.dkd import dkd_loss
from distillery.functional.ensemble import mean_probability_logits
from distillery.functional.features import attention_transfer, feature_distance, hint_loss
from distillery.functional.importance import importance_weighted_reverse_kl
from distillery.functional.kd import kd_loss
from distillery.functional.multi_teacher import (
    MultiTeacherTarget,
    agreement_mask,
    combine_teachers,
    drop_members,
    member_weights,
)
from distillery.functional.nkd import nkd_loss
from distillery.functional.paced import paced_weights
from distillery.functional.relations import (
    linear_cka_loss,
    rkd_angle,
    rkd_distance,
    similarity_preserving,
)
from distillery.functional.self_supervised import (
    byol_loss,
    data2vec_loss,
    data2vec_targets,
    dino_loss,
    dino_target_entropies,
    ibot_patch_loss,
    koleo_loss,
    update_center,
)
from distillery.functional.semi_supervised import consistency_mse, pseudo_label_loss
from distillery.functional.sparse import (
    check_sparse_divergence,
    chunked_sparse_kd_from_hidden,
    dequantize_logprobs,
    quantize_logprobs,
    sample_tokens,
    sampled_forward_kl,
    sparse_divergence_support,
    tail_from_topk_logp,
    topk_tail,
    topk_tail_divergence,
)
from distillery.functional.uskd import uskd_loss

__all__ = [
    "MultiTeacherTarget",
    "agreement_mask",
    "alpha_sigma",
    "attention_kl",
    "attention_score_mse",
    "attention_transfer",
    "batch_norm_statistics",
    "bn_feature_loss",
    "byol_loss",
    "check_sparse_divergence",
    "chunked_cross_entropy_from_hidden",
    "chunked_kd_from_hidden",
    "chunked_sparse_kd_from_hidden",
    "combine_teachers",
    "composed_gradients",
    "consistency_distillation_loss",
    "consistency_mse",
    "consistency_skip_out",
    "cross_entropy",
    "data2vec_loss",
    "data2vec_targets",
    "ddim_step",
    "dequantize_logprobs",
    "dino_loss",
    "dino_target_entropies",
    "dkd_loss",
    "drop_members",
    "eps_from_v",
    "feature_distance",
    "forward_kl",
    "generalized_jsd",
    "hint_loss",
    "ibot_patch_loss",
    "image_l2",
    "image_total_variation",
    "importance_weighted_reverse_kl",
    "karras_sigmas",
    "kd_loss",
    "koleo_loss",
    "linear_cka_loss",
    "magnitude_mask",
    "mean_probability_logits",
    "member_weights",
    "nkd_loss",
    "paced_weights",
    "progressive_distillation_loss",
    "progressive_distillation_target",
    "pseudo_huber",
    "pseudo_label_loss",
    "quantize_logprobs",
    "reverse_kl",
    "rkd_angle",
    "rkd_distance",
    "sample_tokens",
    "sampled_forward_kl",
    "self_relation_kl",
    "should_chunk",
    "similarity_preserving",
    "skew_kl",
    "skew_reverse_kl",
    "snr_truncated_weight",
    "span_likelihood_loss",
    "sparse_divergence_support",
    "sparsity_at",
    "tail_from_topk_logp",
    "topk_tail",
    "topk_tail_divergence",
    "total_variation",
    "uld_loss",
    "update_center",
    "uskd_loss",
    "v_target",
    "value_relation_kl",
    "x_from_eps",
    "x_from_v",
]
