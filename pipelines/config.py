"""The pipelines' typed configs: `mmkd teacher-pass` (TeacherPassConfig) and `mmkd demo`
(DemoConfig). Free of torch, transformers and Ray so that the command line builds fast;
each field's comment is its flag's help (common.config.add_flags).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mmkd.common.config import InputsConfig, inline
from mmkd.student.config import LlavaArch


@dataclass
class TeacherPassConfig:
    teacher: str = ""  # Hugging Face model folder of the teacher (weights + processor)
    inputs: InputsConfig = inline(InputsConfig)  # data, image_root, data_split, image_column, id_column
    output: str = ""  # cache folder (or fsspec URL) to create or resume
    records: str = "response"  # comma list of response, visual, relation; or "preference" (data = pairs JSONL)
    mode: str = "topk"  # "topk": k most probable ids; "sampled": ids drawn from the teacher
    k: int = 64  # top-k entries kept per supervised position (mode topk)
    draws: int = 32  # ids drawn per supervised position (mode sampled; at most 255)
    seed: int = 0  # the order of batches and of rows in shards; sampling (mode sampled: draws depend on the ids too)
    temperature: float = 1.0  # divides the teacher's logits before the softmax
    dtype: str = "float32"  # teacher dtype: float32, bfloat16, float16
    device: str = "auto"  # "auto" = CUDA when present, else CPU
    device_map: str = ""  # "auto": spread a teacher larger than one GPU over the worker's GPUs
    trust_remote_code: bool = False  # run a checkpoint's own Python code (off unless you turn it on)
    batch_size: int = 16  # samples per teacher forward (the driver groups samples of similar length)
    prefetch_batches: int = -1  # batches a worker preprocesses while its teacher runs one; -1 = 1 on GPUs, 0 on CPUs
    num_workers: int = 1  # teacher actors in the pool
    num_gpus_per_worker: float = -1  # -1 = 1 when CUDA is present, else 0
    rows_per_shard: int = 512  # samples per Parquet shard (a shard is the unit of commit and resume)
    max_length: int = 2048  # longest sample, in tokens (a longer one is quarantined by its id, never truncated)
    address: str | None = None  # Ray cluster address ("auto", "ray://..."); None = local Ray
    new_cache: bool = False  # replace a cache in `output` made with other settings
    backend: str = "transformers"  # teacher runtime: transformers | vllm (docs/vllm-backend.md)
    tensor_parallel_size: int = 1  # vllm only: GPUs per teacher (one actor gets this many)
    vllm_args: str = ""  # vllm only: JSON object of extra vllm.LLM() arguments, e.g. {"gpu_memory_utilization": 0.8}
    fail_fast: bool = False  # stop at the first bad sample instead of quarantining it to <output>/errors.jsonl
    max_retries: int = 3  # times Ray retries a batch whose worker process died; then its samples are reported


@dataclass
class DemoConfig:
    workdir: str = "runs/demo"  # where every step writes (steps already done there are skipped)
    seed: int = 0  # data set, weights and orders
    num_train: int = 4000  # synthetic training samples
    num_val: int = 200  # validation samples (the teacher's exact match)
    num_test: int = 400  # test samples (the results table)
    num_preference: int = 400  # preference pairs (LLaVA-MoD's last stage)
    k: int = 16  # top-k kept per supervised token (the demo vocabulary has ~50 entries)
    teacher_arch: LlavaArch = field(default_factory=LlavaArch)  # the teacher's sizes
    teacher_epochs: int = 20  # the teacher's supervised training
    teacher_lr: float = 5e-4  # the teacher's peak learning rate
    # the students' sizes (all of them: (a)-(d) and the recipes' stages)
    student_arch: LlavaArch = field(default_factory=lambda: LlavaArch(
        vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=64, text_layers=2, text_heads=2,
        text_intermediate=128))
    student_subset: int = 1500  # both students train on the same first N (shuffled) samples
    student_epochs: int = 15  # each of the students (a)-(d)
    student_lr: float = 2e-3  # the students' peak learning rate
    batch_size: int = 32  # samples per step, teacher and students
    fresh: bool = False  # delete the workdir and start over
