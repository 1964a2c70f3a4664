"""The online baseline of the seed papers, for comparison only: the teacher resident next to
the student, its full-vocabulary logits recomputed on every batch.

LLaVA-KD and LLaVA-MoD keep the teacher on every GPU and take the dense KL at every step;
mmkd replaces that with a cache (docs/architecture.md, invariant 5). `TrainConfig.online_teacher`
brings the old way back so that both can be compared on the same data, student and settings
(benchmarks/bench_offline_online.py): the teacher runs on the student's own batch (the
same token ids and images) and its logits are taken at exactly the rows the student's
terms use (student.outputs.StudentOutputs runs on both models), so the KD terms become
the full-vocabulary divergence (student.targets.Dense) instead of a cached approximation.
The price: one teacher forward per step and the teacher's weights in memory on every rank.

The teacher is any image-text-to-text folder student.model.load_model opens (a Hugging Face
checkpoint, or an mmkd student); student/ does not import teacher_cache/.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from mmkd.common.check import compare_processors
from mmkd.common.models import is_text_only, load_processor
from mmkd.common.preprocess import image_token_id, process_image
from mmkd.student.model import load_model
from mmkd.student.outputs import StudentOutputs
from mmkd.student.targets import Batch, Dense


def check_same_inputs(teacher_processor, student_processor, teacher_path: str) -> None:
    """The teacher reads the student's batch as it is, so both processors must turn a sample
    into the same model inputs: vocabulary, special tokens, chat template, image token,
    visual-token count and pixel values. Raises ValueError naming each difference."""
    bad = [c for c in compare_processors(teacher_processor, student_processor) if not c.ok]
    msgs = [f"{c.name}: teacher {c.teacher}, student {c.student}" for c in bad]
    if not (bad or is_text_only(student_processor)):
        probe = Image.new("RGB", (48, 40), (30, 160, 90))
        t_in, s_in = process_image(teacher_processor, probe)[1], process_image(student_processor, probe)[1]
        if t_in.keys() != s_in.keys() or not all(np.array_equal(t_in[k], s_in[k]) for k in t_in):
            msgs.append("image preprocessing: the two processors give different pixel values for the same image")
    if msgs:
        raise ValueError(f"teacher {teacher_path}: it cannot read the student's batches: "
                         + "; ".join(msgs) + ". Use the teacher's processor for the student (processor: "
                         f"{teacher_path})")


class OnlineTeacher:
    """A frozen teacher (eval mode, no gradients) on `device` in `dtype`, checked against
    the student's processor and output head.

    vocab_size: the shared vocabulary both models are scored over (the tokenizer's ids
    that the teacher's head scores; padded head rows are no tokens).
    """

    def __init__(self, path: str, student_processor, student, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
        check_same_inputs(load_processor(path), student_processor, path)
        model = load_model(path, dtype, device).eval().requires_grad_(False)
        self.vocab_size = min(len(student_processor.tokenizer), model.get_output_embeddings().weight.shape[0])
        width = student.get_output_embeddings().weight.shape[0]
        if width < self.vocab_size:
            raise ValueError(f"teacher {path}: it scores {self.vocab_size} ids, the student's "
                             f"output head has only {width} rows; the student must share the teacher's vocabulary")
        self.rows = StudentOutputs(model, image_token_id(student_processor), self.vocab_size)

    @torch.no_grad()
    def targets(self, batch: Batch, visual: bool = False, relation: bool = False) -> dict:
        """The teacher's targets for the student's batch, from one forward on it (the same
        token ids and images), at exactly the student's rows: "response", Dense (its hidden
        states at the rows predicting the N supervised tokens, and its head); "visual",
        Dense at the M image tokens (visual); "relation", one raw teacher relation matrix
        [n, n] per sample (relation)."""
        out = self.rows(batch.input_ids, batch.attention_mask, batch.labels, batch.vision or None, relation=relation,
                        hidden_rows=True)
        got = {"response": Dense(out["hidden"]["response"], out["head"])}
        if visual:
            got["visual"] = Dense(out["hidden"]["visual"], out["head"])
        if relation:
            got["relation"] = out["relations"]
        return got

    def fill(self, batch: Batch, visual: bool = False, relation: bool = False) -> Batch:
        """The batch with the teacher's targets (targets()) in place of a cache's."""
        for kind, value in self.targets(batch, visual, relation).items():
            setattr(batch, kind, value)
        return batch
