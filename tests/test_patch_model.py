"""patch_model on plain PyTorch modules and on a Hugging Face model built from a config (no download)."""
import asyncio
import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from helpers import close, finetuned_copy, pack_models
from torch import nn

import xorgemm
from xorgemm import XorLinear
from xorgemm.testing import seed_scenario


class MLP(nn.Module):
    def __init__(self, d=96, h=160):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(self.norm(x))))


def test_seed_layer_single_finetune(tmp_path):
    base, ft = seed_scenario()
    path = pack_models(tmp_path, base, ft, "seed")
    patched = xorgemm.patch_model(copy.deepcopy(base), {"seed": path}, active="seed")
    rep = patched.xorgemm.report
    assert sorted(rep.replaced) == ["ff.0", "ff.2"]
    assert "self_attn.out_proj" in rep.skipped  # nn.MultiheadAttention reads its weight directly
    assert "self_attn.in_proj_weight" in rep.dense and "ln1.weight" in rep.dense
    x = torch.randn(4, 16, 64)
    with torch.no_grad():
        assert close(patched(x), ft(x))
        with xorgemm.use(patched, None):
            assert close(patched(x), base(x))
        assert close(patched(x), ft(x))  # the previous choice is back


def test_base_weight_storage_is_shared(tmp_path):
    base = MLP()
    path = pack_models(tmp_path, base, finetuned_copy(base, 1), "a")
    ptr = base.up.weight.data_ptr()
    patched = xorgemm.patch_model(base, path)
    assert isinstance(patched.up, XorLinear) and patched.up.base_weight.data_ptr() == ptr


def test_mixed_rows_of_several_finetunes(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(MLP(), MLP())
    fts = {n: finetuned_copy(base, i + 1, only_linear=True) for i, n in enumerate(["legal", "med", "code"])}
    paths = {n: pack_models(tmp_path, base, m, n) for n, m in fts.items()}
    patched = xorgemm.patch_model(copy.deepcopy(base), paths)
    assert len(patched.xorgemm.report.replaced) == 4
    x = torch.randn(6, 5, 96)
    ids = torch.tensor([0, 1, 2, -1, 1, 0])
    with torch.no_grad(), xorgemm.use(patched, ids):
        y = patched(x)
    refs = [base] + list(fts.values())
    for row, i in enumerate(ids.tolist()):
        with torch.no_grad():
            assert close(y[row], refs[i + 1](x[row:row + 1])[0])


def test_mixed_rows_of_full_finetunes_follow_every_tensor(tmp_path):
    """Fine-tunes that differ in every tensor (LayerNorm included) mixed row by row: each row exactly as its
    dense model serves it, and the model's own tensors stay the base's."""
    torch.manual_seed(1)
    base = nn.Sequential(MLP(), MLP())
    fts = {n: finetuned_copy(base, i + 1) for i, n in enumerate(["a", "b", "c"])}
    patched = xorgemm.patch_model(copy.deepcopy(base), {n: pack_models(tmp_path, base, m, n) for n, m in fts.items()})
    assert "0.norm.weight" in patched.xorgemm.report.dense
    x = torch.randn(7, 5, 96)
    ids = torch.tensor([0, 1, 2, -1, 2, 0, 1])
    with torch.no_grad(), xorgemm.use(patched, ids):
        y = patched(x)
    refs = [base] + list(fts.values())
    with torch.no_grad():
        for row, i in enumerate(ids.tolist()):
            assert close(y[row], refs[i + 1](x[row:row + 1])[0])
    assert torch.equal(patched[0].norm.weight, base[0].norm.weight)  # never overwritten


def test_one_delta_makes_the_model_that_finetune(tmp_path):
    base = MLP()
    ft = finetuned_copy(base, 2)
    patched = xorgemm.patch_model(copy.deepcopy(base), pack_models(tmp_path, base, ft, "a"))
    x = torch.randn(3, 96)
    with torch.no_grad():
        assert patched.xorgemm.default == "finetune" and close(patched(x), ft(x))
        two = xorgemm.patch_model(copy.deepcopy(base), {"a": tmp_path / "a.xor.safetensors",
                                                        "b": tmp_path / "a.xor.safetensors"})
        assert two.xorgemm.default is None and close(two(x), base(x))  # several: the base until chosen


def test_refuses_a_delta_for_another_base(tmp_path):
    base = MLP()
    path = pack_models(tmp_path, base, finetuned_copy(base, 1), "a")
    other = finetuned_copy(base, 9)
    with pytest.raises(xorgemm.BaseMismatchError, match="base bytes do not match"):
        xorgemm.patch_model(other, path)
    with pytest.raises(xorgemm.BaseMismatchError, match="no such tensor"):
        xorgemm.patch_model(nn.Sequential(nn.Linear(96, 96)), path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_a_gpu_this_machine_lacks_is_an_xorgemm_error(tmp_path):
    base = MLP()
    path = pack_models(tmp_path, base, finetuned_copy(base, 1), "a")
    for device in ("cuda", "cuda:3", torch.device("cuda")):
        with pytest.raises(xorgemm.InputError, match="no CUDA GPU is available"):
            xorgemm.patch_model(copy.deepcopy(base), path, device=device)
    with pytest.raises(xorgemm.InputError, match="not a device torch knows"):
        xorgemm.patch_model(copy.deepcopy(base), path, device="gpu0")


def test_unknown_finetune_and_unpatched_model(tmp_path):
    base = MLP()
    patched = xorgemm.patch_model(copy.deepcopy(base), {"a": pack_models(tmp_path, base, finetuned_copy(base, 1), "a")})
    with pytest.raises(xorgemm.InputError, match="unknown fine-tune 'b'"):
        xorgemm.select(patched, "b")
    with pytest.raises(xorgemm.InputError, match="-1..0"):
        xorgemm.select(patched, torch.tensor([0, 4]))
    with pytest.raises(xorgemm.InputError, match="not patched"):
        xorgemm.select(MLP(), "a")


transformers = pytest.importorskip("transformers")


def tiny_bert():
    cfg = transformers.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=96, max_position_embeddings=40)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg).eval()


def test_hugging_face_model_same_logits_as_dense_finetune(tmp_path):
    base = tiny_bert()
    ft = finetuned_copy(base, 3)  # everything changes: embeddings, norms, linears, classifier
    path = pack_models(tmp_path, base, ft, "ft")
    patched = xorgemm.patch_model(copy.deepcopy(base), {"ft": path}, active="ft")
    assert len(patched.xorgemm.report.replaced) == 2 * 6 + 2  # q,k,v,o,up,down per layer + pooler + classifier
    ids = torch.randint(0, 120, (3, 12))
    with torch.no_grad():
        got = patched(input_ids=ids).logits
        want = ft(input_ids=ids).logits
        assert close(got, want)
        with xorgemm.use(patched, None):
            assert close(patched(input_ids=ids).logits, base(input_ids=ids).logits)


def test_hugging_face_model_mixed_batch(tmp_path):
    """Full fine-tunes, every tensor changed (embeddings, position embeddings, norms, classifier), mixed row by
    row in one forward: each row as its dense model serves it."""
    base = tiny_bert()
    fts = [finetuned_copy(base, s) for s in (4, 5)]
    patched = xorgemm.patch_model(copy.deepcopy(base), {f"f{i}": pack_models(tmp_path, base, m, f"f{i}")
                                                        for i, m in enumerate(fts)})
    ids = torch.randint(0, 120, (3, 12))
    rows = torch.tensor([1, -1, 0])
    with torch.no_grad(), xorgemm.use(patched, rows):
        got = patched(input_ids=ids).logits
    refs = [base] + fts
    with torch.no_grad():
        for r, i in enumerate(rows.tolist()):
            assert close(got[r], refs[i + 1](input_ids=ids[r:r + 1]).logits[0], 1e-4)


def _two_finetunes(tmp_path):
    torch.manual_seed(2)
    base = MLP()
    fts = {n: finetuned_copy(base, i + 1) for i, n in enumerate(["a", "b"])}  # norms differ too
    patched = xorgemm.patch_model(copy.deepcopy(base), {n: pack_models(tmp_path, base, m, n) for n, m in fts.items()})
    return base, fts, patched


def test_concurrent_threads_each_get_their_own_finetune(tmp_path):
    """Four threads serve two fine-tunes through one model: every request gets exactly its own fine-tune."""
    base, fts, patched = _two_finetunes(tmp_path)
    x = torch.randn(2, 8, 96)
    with torch.no_grad():
        want = {n: fts[n](x) for n in fts} | {None: base(x)}
    wrong = []

    def serve(name, n_requests):
        for _ in range(n_requests):
            with torch.no_grad(), xorgemm.use(patched, name):
                if not close(patched(x), want[name]):
                    wrong.append(name)

    threads = [threading.Thread(target=serve, args=(n, 60)) for n in ("a", "b", None, "a")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong, f"{len(wrong)} of 240 requests got another fine-tune's output"
    assert patched.xorgemm.current() is None  # this thread chose nothing


def test_concurrent_asyncio_tasks_each_get_their_own_finetune(tmp_path):
    base, fts, patched = _two_finetunes(tmp_path)
    x = torch.randn(2, 8, 96)
    with torch.no_grad():
        want = {n: fts[n](x) for n in fts}

    async def serve(name):
        ok = True
        for _ in range(20):
            with xorgemm.use(patched, name):
                await asyncio.sleep(0)  # the other task runs in between, inside its own `use`
                with torch.no_grad():
                    ok &= close(patched(x), want[name])
        return ok

    async def main():
        return await asyncio.gather(serve("a"), serve("b"), serve("a"))

    assert asyncio.run(main()) == [True, True, True]


def test_per_row_ids_under_inference_mode(tmp_path):
    """Serving engines run models under torch.inference_mode: per-row ids made there (no version counter)."""
    base, fts, patched = _two_finetunes(tmp_path)
    with torch.inference_mode():
        x = torch.randn(3, 96)
        ids = torch.tensor([1, 0, -1])
        for _ in range(2):  # the second call must not take a cached copy keyed on a version it cannot read
            with xorgemm.use(patched, ids):
                y = patched(x)
            assert close(y[0], fts["b"](x[:1])[0]) and close(y[1], fts["a"](x[1:2])[0])
            assert close(y[2], base(x[2:])[0])
        layer = patched.up
        assert close(layer(x, finetune=ids)[0], F.linear(x[:1], layer.materialize("b"), fts["b"].up.bias)[0])


def tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_llama_full_finetunes_mixed_per_row_match_their_dense_models(tmp_path):
    """The decoder architecture vLLM serves: RMSNorms, embeddings, the head and every projection differ
    between three full fine-tunes; one forward over rows of all three and the base gives each row its own
    model's logits and greedy tokens."""
    base = tiny_llama()
    fts = [finetuned_copy(base, s) for s in (6, 7, 8)]
    patched = xorgemm.patch_model(copy.deepcopy(base), {f"f{i}": pack_models(tmp_path, base, m, f"f{i}")
                                                        for i, m in enumerate(fts)})
    rep = patched.xorgemm.report
    assert "model.norm.weight" in rep.dense and "model.embed_tokens.weight" in rep.dense
    assert "lm_head" in rep.replaced
    tokens = torch.randint(0, 128, (5, 10), generator=torch.Generator().manual_seed(3))
    rows = torch.tensor([2, -1, 0, 1, 2])
    with torch.no_grad(), xorgemm.use(patched, rows):
        got = patched(input_ids=tokens).logits
    refs = [base] + fts
    with torch.no_grad():
        for r, i in enumerate(rows.tolist()):
            want = refs[i + 1](input_ids=tokens[r:r + 1]).logits[0]
            assert close(got[r], want, 1e-4)
            assert torch.equal(got[r].argmax(-1), want.argmax(-1))


def test_a_served_model_deep_copies(tmp_path):
    """copy.deepcopy of a patched model (routed modules hold locks): the copy serves on its own."""
    base, fts, patched = _two_finetunes(tmp_path)
    twin = copy.deepcopy(patched)
    x = torch.randn(4, 96)
    ids = torch.tensor([0, 1, -1, 1])
    with torch.no_grad(), xorgemm.use(twin, ids):
        y = twin(x)
        assert close(y[0], fts["a"](x[:1])[0]) and close(y[1], fts["b"](x[1:2])[0]) and close(y[2], base(x[2:3])[0])
    with torch.no_grad():
        assert close(patched(x), base(x))  # the original's own selection (the base) is unaffected
    xorgemm.remove_finetune(twin, "a")
    assert twin.xorgemm.finetunes == ["b"] and patched.xorgemm.finetunes == ["a", "b"]


def test_routed_modules_refuse_ids_over_more_than_the_batch_dimension(tmp_path):
    """A norm routed per row takes one id per batch row; per-token ids are a clear error, not a wrong answer."""
    _, _, patched = _two_finetunes(tmp_path)
    with torch.no_grad(), xorgemm.use(patched, torch.tensor([[0, 1], [1, 0]])):
        with pytest.raises(xorgemm.InputError, match="one id per batch row"):
            patched(torch.randn(2, 2, 96))
