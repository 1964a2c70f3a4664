import numpy as np
import pytest
from PIL import Image

from mmkd.common.inputs import load_image
from mmkd.common.preprocess import IGNORE_INDEX, collate, encode_sample, image_token_count, image_token_id
from mmkd.common.samples import Sample, SampleError, read_llava, resolve_image


def _sample(convs, image="x.png", sid="s1"):
    return Sample.from_llava({"id": sid, "image": image, "conversations": convs})


def _tokens(processor, ids):
    return processor.tokenizer.convert_ids_to_tokens([int(i) for i in ids])


def test_labels_cover_exactly_the_assistant_turns(processor):
    s = _sample([{"from": "human", "value": "<image>\nhow many shapes are there?"},
                 {"from": "gpt", "value": "two"},
                 {"from": "human", "value": "is there a red circle?"},
                 {"from": "gpt", "value": "no"}])
    e = encode_sample(processor, s, Image.new("RGB", (32, 32)), max_length=128)
    sup = _tokens(processor, e.input_ids[e.labels != IGNORE_INDEX])
    assert sup == ["two", "</s>", "no", "</s>"]
    assert (e.labels[e.labels != IGNORE_INDEX] == e.input_ids[e.labels != IGNORE_INDEX]).all()
    # the image placeholder became the model's visual token count, before the question
    n_img = int((e.input_ids == image_token_id(processor)).sum())
    assert n_img == image_token_count(processor) == 4
    assert e.vision["pixel_values"].shape == (1, 3, 32, 32)


def test_sequence_matches_the_chat_template_rendering(processor):
    s = _sample([{"from": "human", "value": "<image>\nwhat color is the circle?"}, {"from": "gpt", "value": "red"}])
    e = encode_sample(processor, s, Image.new("RGB", (32, 32)), max_length=128)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the circle?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]
    text = processor.apply_chat_template(msgs, tokenize=False)
    # An independent route: the processor's own image-token expansion and tokenisation.
    ref = processor(text=text, images=[Image.new("RGB", (32, 32))], return_tensors="np")
    assert e.input_ids.tolist() == ref["input_ids"][0].tolist()


def test_too_long_and_bad_placeholders_are_refused_with_the_sample_id(processor):
    s = _sample([{"from": "human", "value": "<image>\ndescribe the image."},
                 {"from": "gpt", "value": "there is a red circle at the top left."}], sid="long-one")
    with pytest.raises(SampleError, match="long-one.*max_length"):
        encode_sample(processor, s, Image.new("RGB", (32, 32)), max_length=10)
    with pytest.raises(SampleError, match="s9.*placeholders"):
        _sample([{"from": "human", "value": "no image here"}, {"from": "gpt", "value": "x"}], sid="s9")
    with pytest.raises(SampleError, match="s8.*no assistant"):
        _sample([{"from": "human", "value": "<image>\nhi"}], sid="s8")


def test_image_paths_cannot_escape_the_root(tmp_path):
    (tmp_path / "root").mkdir()
    with pytest.raises(SampleError, match="escapes"):
        resolve_image(tmp_path / "root", "../secret.png")
    with pytest.raises(SampleError, match="escapes"):
        resolve_image(tmp_path / "root", "/etc/passwd")


def test_missing_image_names_the_sample(tmp_path):
    s = _sample([{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}], image="nope.png",
                sid="lost")
    with pytest.raises(SampleError, match="lost"):
        load_image(tmp_path, s)


def test_duplicate_ids_are_refused(tmp_path):
    p = tmp_path / "d.jsonl"
    row = '{"id": "a", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}\n'
    p.write_text(row + row)
    with pytest.raises(SampleError, match="twice"):
        read_llava(p)


def test_collate_right_pads(processor, demo_dir):
    samples = read_llava(demo_dir / "train.json")[:4]
    enc = [encode_sample(processor, s, load_image(demo_dir, s), 128) for s in samples]
    b = collate(enc, pad_id=0)
    for i, e in enumerate(enc):
        n = len(e.input_ids)
        assert b["attention_mask"][i].sum() == n
        assert (b["input_ids"][i, :n] == e.input_ids).all()
        assert (b["labels"][i, n:] == IGNORE_INDEX).all()
    assert b["pixel_values"].shape == (4, 3, 32, 32)
    assert np.isfinite(b["pixel_values"]).all()
