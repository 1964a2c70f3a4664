"""The student side's typed configs: `mmkd train` (TrainConfig), `mmkd eval` (EvalConfig)
and the sizes and MoE settings they nest (LlavaArch, MoEConfig).

Kept apart from the code that runs them and free of torch and transformers, so that
building the command line (`mmkd train --help`) imports nothing heavy. Each field's comment
is its flag's help (common.config.add_flags); the checks of values are the recipes'
(student.train.check_config, student.evaluate.check_config).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from mmkd.common.config import InputsConfig, inline


@dataclass
class LlavaArch:
    """Sizes of a LLaVA-1.5-style model: CLIP vision tower + MLP projector + Llama LLM."""

    vision_hidden: int = 64  # CLIP vision tower width
    vision_layers: int = 2  # vision tower layers
    vision_heads: int = 4  # vision tower attention heads
    text_hidden: int = 128  # Llama LLM width
    text_layers: int = 4  # LLM decoder layers
    text_heads: int = 4  # LLM attention heads
    text_intermediate: int = 256  # LLM FFN width
    max_positions: int = 256  # LLM positions: the longest sequence the model takes


@dataclass
class MoEConfig:
    """How to upcycle a dense student.

    num_experts: experts per MoE layer (each starts as a copy of the dense FFN).
    top_k: experts per token, 1 or 2 (the gatings DeepSpeed's MoE layer supports). Only
        top-2 preserves the dense function at initialisation (see the module docstring).
    every: upcycle every `every`-th decoder layer, the last of each group of `every`:
        layers i with i % every == every - 1, i.e. 1, 3, 5, ... for every=2, all layers for
        every=1. This is the GShard / Switch Transformer layout ("every other FFN layer is
        an MoE layer") with the first layer kept dense, which halves the expert parameters
        and all-to-all traffic of upcycling every layer.
    capacity_factor / eval_capacity_factor: expert capacity (tokens an expert takes per
        forward) as a multiple of the even share, in training / eval. Top-2 gating doubles
        it (DeepSpeed). With drop_tokens, routes over capacity are dropped: a token keeps
        its other route at full weight, and a token that loses all its routes gets 0 from
        the layer (the residual connection carries it).
    min_capacity: the least capacity per expert whatever the factor.
    drop_tokens: False gives every expert room for all its tokens (no dropping).
    aux_weight: the weight of the load-balancing loss (moe_aux_loss) in the training loss.
    top2_sampling: in training, pick the second expert by Gumbel sampling (GShard's random
        routing, DeepSpeed's default); outside training the second expert is always the
        argmax.
    """

    num_experts: int = 4
    top_k: int = 2
    every: int = 2
    capacity_factor: float = 1.5
    eval_capacity_factor: float = 2.0
    min_capacity: int = 4
    drop_tokens: bool = True
    aux_weight: float = 0.01
    top2_sampling: bool = True

    def __post_init__(self):
        if self.top_k not in (1, 2):
            raise ValueError(f"top_k={self.top_k}: DeepSpeed's MoE layer supports top-1 and top-2 gating")
        if self.num_experts < self.top_k:
            raise ValueError(f"num_experts={self.num_experts} is fewer than top_k={self.top_k}")
        if self.every < 1:
            raise ValueError(f"every={self.every} must be >= 1")
        if self.min_capacity < 0 or self.capacity_factor <= 0 or self.eval_capacity_factor <= 0:
            raise ValueError("capacity factors must be > 0 and min_capacity >= 0")

    def layer_indices(self, num_layers: int) -> list[int]:
        """The decoder layers this config upcycles, out of num_layers."""
        return [i for i in range(num_layers) if i % self.every == self.every - 1]

    @classmethod
    def from_dict(cls, d: dict) -> "MoEConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown MoE config keys {unknown} (saved by a newer mmkd?)")
        return cls(**d)


@dataclass
class TrainConfig:
    inputs: InputsConfig = inline(InputsConfig)  # data, image_root, data_split, image_column, id_column
    processor: str = ""  # processor folder (tokenizer, chat template, image processor)
    output_dir: str = ""  # where the trained model (HF folder) and logs go
    cache: str | None = None  # teacher cache folder; None trains with CE only
    online_teacher: str | None = None  # comparison only: this teacher resident, full-vocabulary KD (no cache)
    init_from: str | None = None  # start from this saved model (multimodal or text-only) instead of random weights
    # the seed papers' student (student.model.compose_llava): this pretrained causal LM as the LLM, the vision tower
    # copied from `vision_from` (a multimodal model folder: the teacher's) and a new projector; saved to output_dir/init
    student_llm: str | None = None
    vision_from: str | None = None  # with student_llm: the multimodal model folder whose vision tower is copied
    projector_act: str = "gelu"  # activation between the new projector's two layers
    arch: LlavaArch = field(default_factory=LlavaArch)  # sizes when building from scratch (text-only: a Llama LM)
    subset: int = 0  # train on the first N samples after a seeded shuffle; 0 = all
    objective: str = "distill"  # "distill" (CE + KD terms) or "preference" (DPO / KTO-pair)
    trainable: str = "all"  # all | projector | llm+projector | moe (see student.model.set_trainable)
    ce_weight: float = 1.0  # cross-entropy on the reference tokens
    kd_weight: float = 1.0  # response targets; used only with a cache
    visual_weight: float = 0.0  # MDist visual term (needs a cache with visual records)
    relation_weight: float = 0.0  # RDist (needs a cache with relation records)
    divergence: str = "forward_kl"  # forward_kl | reverse_kl | jsd, see student.losses
    kd_leftover: str = "bucket"  # "bucket" or "renormalize", see student.losses
    relation_pooling: str = "sample"  # "sample" (mean of per-sample cosines) or "batch" (one pooled cosine; see docs/methods.md)
    preference_loss: str = "dpo"  # dpo | kto_pair (objective preference)
    beta: float = 0.1  # preference loss temperature
    upcycle: bool = False  # turn the (dense) initial model into an MoE student first
    moe: MoEConfig = field(default_factory=MoEConfig)  # experts, top-k, capacity, aux_weight
    epochs: int = 1  # passes over the training samples
    max_steps: int = 0  # stop after this many optimizer steps; 0 = run all epochs
    batch_size: int = 32  # per rank, per micro-step; global batch = batch_size x grad_accum x ranks
    grad_accum: int = 1  # micro-batches per optimizer step
    optimizer: str = "adamw"  # adamw | adam (student.optim)
    adam_beta1: float = 0.9  # Adam's first-moment decay
    adam_beta2: float = 0.999  # Adam's second-moment decay
    adam_epsilon: float = 1e-8  # Adam's denominator term
    lr: float = 2e-5  # peak learning rate (LLaVA-1.5's fine-tuning rate; projector-only stages use ~1e-3)
    lr_schedule: str = "cosine"  # cosine | linear | constant, after a linear warmup (student.optim)
    warmup_ratio: float = 0.03  # warmup steps = max(1, int(warmup_ratio x optimizer steps))
    weight_decay: float = 0.0  # decoupled weight decay (adamw), L2 (adam)
    grad_clip: float = 1.0  # clip the gradient's global norm to this; 0 = no clipping
    zero_stage: int = 0  # DeepSpeed ZeRO stage (0-3; MoE students 0-2)
    # your DeepSpeed JSON (offload, bucket sizes, ...), merged with what mmkd sets from its flags
    # (student.parallel.deepspeed_config; a different value for one of those is refused, naming both)
    deepspeed: str | None = None
    gradient_checkpointing: bool = False  # recompute activations in the backward (less memory, ~30% more time)
    attn_implementation: str | None = None  # transformers attention: eager | sdpa | flash_attention_2 (None: default)
    dtype: str = "float32"  # or "bfloat16"
    # longest sample, in tokens (a longer one is refused by its id, never truncated); 0 = the student's limit: its
    # text model's max_position_embeddings (the tokenizer's model_max_length when smaller)
    max_length: int = 0
    num_workers: int = 1  # data loader processes encoding samples while the step runs
    keep_encoded: bool = False  # keep encoded samples in memory (small data, many epochs; needs num_workers=0)
    seed: int = 0  # weights built from scratch, the epoch order, the subset, dropout
    # the epoch plan (storage/plan.py): rows are read in `data_streams` streams of shuffled shards (0 = one per
    # rank; set it to a multiple of the largest rank count to train the same on any number of ranks that divides
    # it), permuted within windows of `shuffle_window` rows (a larger window shuffles wider and holds more rows)
    data_streams: int = 0
    shuffle_window: int = 1024  # rows permuted together inside a stream (see data_streams)
    log_every: int = 50  # a log line every N optimizer steps when no progress bar is shown (stdout not a terminal)
    # where the step scalars go besides output_dir/train_log.jsonl: a comma list of tensorboard
    # (output_dir/tensorboard), wandb, mlflow (accelerate's trackers; W&B and MLflow read their usual environment
    # variables); none = the JSON log only
    report_to: str = "tensorboard"
    tracker_project: str = "mmkd"  # the W&B project / MLflow experiment of the run (report_to wandb, mlflow)
    run_name: str = ""  # the run's name in W&B / MLflow; "" = output_dir's folder name
    save_every: int = 200  # optimizer steps between checkpoints (output_dir/checkpoints); 0 = none
    keep_checkpoints: int = 2  # the newest N checkpoints are kept
    resume: bool = True  # continue from output_dir's latest checkpoint (false: start over, deleting them)


@dataclass
class EvalConfig:
    """`mmkd eval`: a saved model scored on a split."""

    model: str = ""  # model folder (with its processor)
    inputs: InputsConfig = inline(InputsConfig)  # the split's samples: data, image_root, data_split, ...
    cache: str | None = None  # teacher cache of the same split, for KL to the teacher
    teacher: str | None = None  # teacher model folder: loaded for the exact full-vocabulary KL (full_kl_to_teacher)
    batch_size: int = 64  # samples per forward
    max_length: int = 0  # longest sample, in tokens; 0 = the model's limit (max_position_embeddings)
    # also write the metrics JSON here (None: MODEL/eval.json when the model is the output folder of
    # `mmkd train`, for `mmkd plot`; "" writes nothing)
    out: str | None = None
