"""opt_torch against Hugging Face transformers 4.57.6 (a test-only reference) on every variant and head."""

import pytest
import torch

from opt_spec import io as spec_io
from opt_spec.testing import VARIANTS, random_batch, random_weights
from opt_torch.modeling import MODEL_CLASSES

from .conftest import HEADS, max_abs_diff

transformers = pytest.importorskip("transformers", reason="the Hugging Face reference needs the test extra")

HF_CLASSES = {"base": "OPTModel", "causal_lm": "OPTForCausalLM",
              "sequence_classification": "OPTForSequenceClassification",
              "question_answering": "OPTForQuestionAnswering"}


def outputs(out, head):
    if head == "base":
        return [out.last_hidden_state]
    if head == "question_answering":
        return [out.start_logits, out.end_logits]
    return [out.logits]


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("hf_attn", ["eager", "sdpa"])
def test_matches_hugging_face(tmp_path, name, head, hf_attn):
    config = VARIANTS[name]
    spec_io.save_safetensors_dir(tmp_path, random_weights(config, head, seed=7), config.to_dict())
    ours = MODEL_CLASSES[head].from_pretrained(tmp_path)
    hf_cls = getattr(transformers, HF_CLASSES[head])
    ref = hf_cls.from_pretrained(tmp_path, attn_implementation=hf_attn, torch_dtype=torch.float32).eval()
    ids, mask = (torch.from_numpy(a).long() for a in random_batch(config, seed=1))
    with torch.no_grad():
        got, want = outputs(ours(ids, mask), head), outputs(ref(input_ids=ids, attention_mask=mask), head)
    for a, b in zip(got, want):
        keep = mask if a.shape[:2] == mask.shape else None  # pooled classifier logits have no time axis
        assert max_abs_diff(a, b, keep) <= 1e-5


def test_reference_loads_what_we_save(tmp_path):
    config = VARIANTS["post_ln_proj"]
    ours = MODEL_CLASSES["causal_lm"].from_config(config, seed=0)
    ours.save_pretrained(tmp_path, max_shard_size="20KB")
    ref = transformers.OPTForCausalLM.from_pretrained(tmp_path).eval()
    ids, mask = (torch.from_numpy(a).long() for a in random_batch(config))
    with torch.no_grad():
        assert max_abs_diff(ours(ids, mask).logits, ref(input_ids=ids, attention_mask=mask).logits, mask) <= 1e-5
