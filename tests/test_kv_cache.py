"""RowCache (rscaffold.kv_cache): rows that take tokens back, join, leave and get compacted still
compute what each row's sequence computes alone."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def alone(backbone, ids: list[int]) -> torch.Tensor:
    """The last hidden state of ``ids`` encoded alone, without a cache."""
    out = backbone(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out.last_hidden_state[0, -1]


@pytest.mark.parametrize("shape", ["llama", "qwen2"])
def test_edited_rows_match_their_sequences_alone(shape):
    from method_shapes import tiny_llama, tiny_qwen2

    from rscaffold.kv_cache import RowCache, supports_row_cache
    from rscaffold.student import backbone_of

    model, _ = tiny_llama() if shape == "llama" else tiny_qwen2()  # tied / untied and padded vocabulary
    model.eval()
    assert supports_row_cache(model)
    backbone = backbone_of(model)
    g = torch.Generator().manual_seed(0)

    def rand(n: int) -> list[int]:
        return torch.randint(5, 400, (n,), generator=g).tolist()

    cache = RowCache(torch.device("cpu"))
    seqs = [rand(7), rand(3)]
    cache.add_rows(2)
    with torch.no_grad():
        h = cache.extend(backbone, seqs)
        for r in range(2):
            torch.testing.assert_close(h[r], alone(backbone, seqs[r]), atol=1e-5, rtol=1e-4)
        # row 0 takes back its last 2 tokens and gets 4 new ones; row 1 gets one
        cache.truncate(0, 5)
        new = [rand(4), rand(1)]
        seqs = [seqs[0][:5] + new[0], seqs[1] + new[1]]
        h = cache.extend(backbone, new)
        assert cache.holes() > 0 and cache.tokens == seqs
        for r in range(2):
            torch.testing.assert_close(h[r], alone(backbone, seqs[r]), atol=1e-5, rtol=1e-4)
        # a row joins, row 0 leaves, the holes are squeezed out; nothing changes for the others
        cache.add_rows(1)
        seqs.append(rand(9))
        h = cache.extend(backbone, [[], [], seqs[2]])
        torch.testing.assert_close(h[2], alone(backbone, seqs[2]), atol=1e-5, rtol=1e-4)
        cache.keep_rows([1, 2])
        seqs = seqs[1:]
        cache.compact()
        assert cache.holes() == 9 - 4 and cache.width == 9
        new = [rand(2), rand(3)]
        h = cache.extend(backbone, new)
        for r in range(2):
            torch.testing.assert_close(h[r], alone(backbone, seqs[r] + new[r]), atol=1e-5, rtol=1e-4)


def test_models_without_full_attention_are_not_cached():
    from transformers import MistralConfig, MistralForCausalLM

    from rscaffold.kv_cache import supports_row_cache

    cfg = MistralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, sliding_window=8,
    )  # fmt: skip
    assert not supports_row_cache(MistralForCausalLM(cfg))
    cfg.sliding_window = None
    assert supports_row_cache(MistralForCausalLM(cfg))
