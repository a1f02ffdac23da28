"""THE matrix: every registered compression policy × (easy, hard) parameters, checked for the shared invariants
of methods.md §0 on one tiny random layer stack (4 layers, 2 KV heads, GQA 2, head_dim 16, 100 tokens, bf16)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from longfit.compression.base import CompressionPolicy, KeepPlan
from longfit.compression.head_scores import write_head_scores
from longfit.compression.quest import page_bounds
from longfit.compression.registry import build_policy, policy_class, registered_policies
from longfit.compression.spec import METHODS, kept_tokens_per_layer, parse_spec
from longfit.compression.storage import kv_bytes, think_channels_kept
from longfit.config import ModelConfig

NUM_LAYERS, NUM_KV_HEADS, GROUPS, NUM_TOKENS, HEAD_DIM = 4, 2, 2, 100, 16
CONFIG = ModelConfig.tiny(num_layers=NUM_LAYERS, num_heads=NUM_KV_HEADS * GROUPS, num_kv_heads=NUM_KV_HEADS,
                          head_dim=HEAD_DIM)

# Every registered policy declares its parameters, easy then hard (degenerate budgets, tiny windows, edge sizes).
CASES: dict[str, tuple[str, str]] = {
    "streaming_llm": ("window=32", "sinks=8,budget=5"),
    "h2o": ("keep=0.5,observe=32", "budget=7,recent_ratio=0,observe=5"),
    "snapkv": ("keep=0.5,window=8", "budget=3,window=8,kernel=1,pool=max"),
    "chunkkv": ("keep=0.3,window=8", "budget=13,window=4,chunk=7"),
    "pyramidkv": ("keep=0.3,window=8,beta=2", "budget=40,window=8,beta=2,kernel=3,pool=max"),
    "tova": ("keep=0.5", "budget=1"),
    "knorm": ("keep=0.5", "budget=5,skip_layers=1"),
    "duo_attention": ("sparsity=0.5,sinks=4,window=16", "sparsity=1,sinks=0,window=3,granularity=head"),
    "think": ("channels=0.5", "channels=0.01,window=1"),
    "shadowkv": ("rank=8", "rank=1"),
    "minicache": ("start=0.5,retain=0.1", "start=0,retain=0"),
    "quest": ("budget=64", "budget=1,page=8,dense_layers=0"),
    "kivi": ("bits=4,group=16,residual=32", "bits=2,key_bits=4,group=8,residual=8"),
    "int8": ("bits=8", ""),
    "kvquant": ("bits=4", "bits=3,group=8,outliers=0.1"),
}


@dataclass(frozen=True)
class PolicyCase:
    name: str
    level: str
    params: str

    @property
    def id(self) -> str:
        return f"{self.name}-{self.level}"


def policy_cases() -> list[PolicyCase]:
    return [PolicyCase(name, level, params) for name in registered_policies()
            for level, params in zip(("easy", "hard"), CASES.get(name, ()))]


@dataclass(frozen=True)
class Layer:
    keys: torch.Tensor  # [Hkv, T, D] bf16
    values: torch.Tensor  # [Hkv, T, D] bf16
    queries: torch.Tensor  # [Hq, T, D] bf16: every prompt token's query; policies use the last window_size


@pytest.fixture(scope="module")
def layers() -> list[Layer]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(NUM_LAYERS):
        keys = torch.randn(NUM_KV_HEADS, NUM_TOKENS, HEAD_DIM, generator=g) * torch.rand(1, 1, HEAD_DIM, generator=g)
        values = torch.randn(NUM_KV_HEADS, NUM_TOKENS, HEAD_DIM, generator=g)
        queries = torch.randn(NUM_KV_HEADS * GROUPS, NUM_TOKENS, HEAD_DIM, generator=g) * 2
        out.append(Layer(keys.bfloat16(), values.bfloat16(), queries.bfloat16()))
    return out


@pytest.fixture(scope="module")
def heads_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("duo") / "heads.json"
    write_head_scores(path, [[0.9, 0.2], [0.1, 0.3], [0.05, 0.4], [0.6, 0.7]], model="tiny-test")
    return str(path)


def spec_text(name: str, params: str, heads_file: str) -> str:
    if name == "duo_attention":
        params = f"heads={heads_file},{params}" if params else f"heads={heads_file}"
    return f"{name}:{params}" if params else name


def build_one(text: str) -> CompressionPolicy:
    (policy,) = build_policy(text)
    return policy


def test_every_registered_policy_has_a_matrix_row() -> None:
    assert set(CASES) == set(registered_policies()) == set(METHODS)


@pytest.mark.parametrize("case", policy_cases(), ids=lambda case: case.id)
def test_spec_parses_and_builds(case: PolicyCase, heads_file: str) -> None:
    spec = parse_spec(spec_text(case.name, case.params, heads_file))
    assert [s.name for s in spec.stages] == [case.name]
    assert parse_spec(spec.text) == spec
    policy = build_one(spec.text)
    assert isinstance(policy, policy_class(case.name)) and policy.kind == METHODS[case.name].kind
    assert policy.when == ("decode" if policy.kind == "select" else "prefill")
    assert policy.window_size >= 0 and (policy.window_size > 0) == (case.name in ("h2o", "snapkv", "chunkkv",
                                                                                  "pyramidkv", "tova", "think"))


@pytest.mark.parametrize("name", registered_policies())
def test_unknown_parameter_names_the_accepted_ones(name: str) -> None:
    with pytest.raises(ValueError, match=f"{name} does not accept 'nonsense'; accepted parameters: "):
        parse_spec(f"{name}:nonsense=1")


def _identity_text(name: str, heads_file: str) -> str:
    params = ",".join(f"{k}={v}" for k, v in METHODS[name].identity)
    return spec_text(name, params, heads_file)


@pytest.mark.parametrize("name", registered_policies())
def test_identity_parameters_are_bit_exact(name: str, layers: list[Layer], heads_file: str) -> None:
    """keep=1 / bits=16 / channels=1 / retain=1 / ... change nothing, bit for bit."""
    policy = build_one(_identity_text(name, heads_file))
    for layer_idx, layer in enumerate(layers):
        plan = policy.plan(layer_idx, NUM_LAYERS, layer.keys, layer.values, layer.queries)
        identity = KeepPlan.keep_all(NUM_KV_HEADS, NUM_TOKENS).kept_indices
        assert plan.is_keep_all and torch.equal(plan.kept_indices, identity)
        assert torch.equal(plan.gather(layer.keys), layer.keys)
        if policy.kind == "quantize":
            keys, values = policy.dequantize(policy.quantize(layer.keys, layer.values))
            assert torch.equal(keys, layer.keys) and torch.equal(values, layer.values)
        elif name == "think":
            assert torch.equal(policy.prune(layer.keys, layer.queries).keys, layer.keys)
        elif name == "shadowkv":
            assert policy.factorize(layer.keys) is None
        elif name == "minicache":
            assert policy.merge(layer.keys, layer.values, layer.keys, layer.values) is None
        elif name == "quest":
            low, high = page_bounds(layer.keys, policy.page)
            pages = policy.select(layer.queries[:, -1], low, high, low.shape[1])
            assert torch.equal(pages, torch.arange(low.shape[1]).repeat(NUM_KV_HEADS, 1))


def _promised(policy: CompressionPolicy, num_kept: int) -> set[int]:
    """Positions the method promises to keep when it evicts (sinks, observation/recent windows)."""
    t, name = NUM_TOKENS, policy.name
    if name == "streaming_llm":
        return set(range(min(policy.sinks, num_kept))) | set(range(t - max(0, num_kept - policy.sinks), t))
    if name in ("snapkv", "chunkkv", "pyramidkv"):
        return set(range(t - min(policy.window, num_kept), t))
    if name == "h2o":
        return set(range(t - policy.num_recent(t), t))
    if name == "tova":
        return {t - 1}
    if name == "duo_attention":
        return set(range(policy.sinks)) | set(range(t - policy.window, t))
    return set()


@pytest.mark.parametrize("case", policy_cases(), ids=lambda case: case.id)
def test_plan_invariants(case: PolicyCase, layers: list[Layer], heads_file: str) -> None:
    """Exact kept count per layer (= spec math), unique ascending indices, promised sinks and windows kept."""
    text = spec_text(case.name, case.params, heads_file)
    policy = build_one(text)
    expected = kept_tokens_per_layer(text, NUM_LAYERS, NUM_TOKENS)
    evicted_somewhere = False
    for layer_idx, layer in enumerate(layers):
        plan = policy.plan(layer_idx, NUM_LAYERS, layer.keys, layer.values, layer.queries)
        plan.validate()
        assert plan.kept_indices.shape == (NUM_KV_HEADS, expected[layer_idx])
        assert policy.num_kept(layer_idx, NUM_LAYERS, NUM_TOKENS) == expected[layer_idx]
        kept_keys = plan.gather(layer.keys)
        assert kept_keys.dtype == layer.keys.dtype and kept_keys.shape == (NUM_KV_HEADS, plan.num_kept, HEAD_DIM)
        if plan.is_keep_all:
            continue
        evicted_somewhere = True
        promised = _promised(policy, plan.num_kept)
        for head in range(NUM_KV_HEADS):
            assert promised <= set(plan.kept_indices[head].tolist()), f"layer {layer_idx} head {head}"
    assert evicted_somewhere == (policy.kind == "evict"), "evicting cases must evict; the others never do"


def _quant_bound(x: torch.Tensor, bits: int) -> float:
    """Loose per-element bound: half a step of the widest possible group (the whole tensor's range)."""
    return float(x.float().max() - x.float().min()) / ((1 << bits) - 1) / 2 * 1.01 + 1e-4


@pytest.mark.parametrize("case", [c for c in policy_cases() if METHODS[c.name].kind != "evict"], ids=lambda c: c.id)
def test_storage_round_trip(case: PolicyCase, layers: list[Layer], heads_file: str) -> None:
    """Non-evicting kinds: shapes and dtypes survive; errors stay within the method's bound."""
    policy = build_one(spec_text(case.name, case.params, heads_file))
    layer, other = layers[0], layers[1]
    if policy.kind == "quantize":
        keys, values = policy.dequantize(policy.quantize(layer.keys, layer.values), torch.float32)
        assert keys.shape == layer.keys.shape and values.shape == layer.values.shape
        for restored, original in ((keys, layer.keys), (values, layer.values)):
            assert float((restored - original.float()).abs().max()) <= _quant_bound(original, policy.bits)
        assert policy.dequantize(policy.quantize(layer.keys, layer.values))[0].dtype == torch.bfloat16
    elif case.name == "think":
        pruned = policy.prune(layer.keys, layer.queries)
        kept = think_channels_kept(HEAD_DIM, policy.channels)
        assert pruned.keys.shape == (NUM_KV_HEADS, NUM_TOKENS, kept) and pruned.keys.dtype == torch.bfloat16
        restored = pruned.restore()
        mask = torch.zeros(NUM_KV_HEADS, 1, HEAD_DIM, dtype=torch.bool).scatter_(2, pruned.channels.unsqueeze(1), True)
        assert torch.equal(restored, layer.keys.masked_fill(~mask, 0))
    elif case.name == "shadowkv":
        factors = policy.factorize(layer.keys)
        assert factors is not None and factors.left.shape == (NUM_TOKENS, policy.rank)
        rebuilt = factors.reconstruct()
        assert rebuilt.shape == layer.keys.shape and rebuilt.dtype == torch.bfloat16
        assert float((rebuilt.float() - layer.keys.float()).norm()) < float(layer.keys.float().norm())
    elif case.name == "minicache":
        pair = policy.merge(layer.keys, layer.values, other.keys, other.values)
        assert pair is not None
        rebuilt = [t.float() for t in policy_unmerge(pair)]
        originals = (layer.keys, layer.values, other.keys, other.values)
        for restored, original in zip(rebuilt, originals):
            assert restored.shape == original.shape
            merged = pair.key_direction.shape[1]  # whole groups; the tokens after them are exact
            by_group = restored[:, :merged].reshape(NUM_KV_HEADS, pair.retained.shape[1], -1, HEAD_DIM)
            index = pair.retained.long().unsqueeze(-1).expand(-1, -1, -1, HEAD_DIM)
            exact = original.float()[:, :merged].reshape(by_group.shape)
            assert torch.equal(by_group.gather(2, index), exact.gather(2, index))  # retained: exact
            assert torch.equal(restored[:, merged:], original.float()[:, merged:])
            norms = original.float().norm(dim=-1)
            assert torch.allclose(restored.norm(dim=-1), norms, rtol=2e-2, atol=1e-2)  # magnitudes restored
    elif case.name == "quest":
        low, high = page_bounds(layer.keys, policy.page)
        pages = policy.select(layer.queries[:, -1], low, high, low.shape[1])
        assert pages.shape == (NUM_KV_HEADS, policy.num_pages_kept(low.shape[1]))
        assert bool((pages.diff(dim=-1) > 0).all()) and bool((pages[:, -1] == low.shape[1] - 1).all())


def policy_unmerge(pair):
    from longfit.compression.merging import unmerge_layers

    return unmerge_layers(pair)


def _stored_bytes(policies: list[CompressionPolicy], layers: list[Layer]) -> int:
    """Run the whole spec on the layer stack the way the engine will, and count the bytes actually stored."""
    evict = next((p for p in policies if p.kind == "evict"), None)
    storage = next((p for p in policies if p.kind in ("quantize", "lowrank", "merge")), None)
    select = next((p for p in policies if p.kind == "select"), None)
    kept = []
    for layer_idx, layer in enumerate(layers):
        plan = (evict or policies[0]).plan(layer_idx, NUM_LAYERS, layer.keys, layer.values, layer.queries)
        kept.append((plan.gather(layer.keys), plan.gather(layer.values)))

    def dense(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    per_layer = [dense(k) + dense(v) for k, v in kept]
    for layer_idx, (keys, values) in enumerate(kept):
        if storage is None:
            break
        if storage.kind == "quantize":
            per_layer[layer_idx] = storage.quantize(keys, values).nbytes()
        elif storage.name == "think":
            per_layer[layer_idx] = storage.prune(keys, layers[layer_idx].queries).nbytes() + dense(values)
        elif storage.name == "shadowkv":
            stored = storage.store(keys, values, keys)  # (the keys stand for their post-RoPE selves: bytes only)
            per_layer[layer_idx] = dense(keys) + dense(values) if stored is None else stored.nbytes()
    if storage is not None and storage.name == "minicache":
        for a, b in storage.layer_pairs(NUM_LAYERS):
            pair = storage.merge(*kept[a], *kept[b])
            if pair is not None:
                per_layer[a], per_layer[b] = pair.nbytes(), 0
    if select is not None:
        for layer_idx in range(select.dense_layers, NUM_LAYERS):
            per_layer[layer_idx] += sum(dense(t) for t in page_bounds(kept[layer_idx][0], select.page))
    return sum(per_layer)


@pytest.mark.parametrize("case", policy_cases(), ids=lambda case: case.id)
def test_kv_bytes_equal_the_stored_tensors(case: PolicyCase, layers: list[Layer], heads_file: str) -> None:
    text = spec_text(case.name, case.params, heads_file)
    assert _stored_bytes(build_policy(text), layers) == kv_bytes(text, CONFIG, NUM_TOKENS)


@pytest.mark.parametrize("text", [
    "snapkv:keep=0.25,window=8+kivi:bits=2,group=16,residual=16",
    "h2o:keep=0.3,observe=16+int8",
    "knorm:keep=0.5+think:channels=0.5",
    "pyramidkv:keep=0.3,window=8,beta=2+shadowkv:rank=4",
    "streaming:window=40+minicache:start=0,retain=0.1",
    "tova:keep=0.5+quest:budget=16,dense_layers=1+kvquant:bits=2,group=8",
])
def test_composed_specs(text: str, layers: list[Layer]) -> None:
    policies = build_policy(text)
    assert [p.kind for p in policies] == [s.kind for s in parse_spec(text).stages]
    assert _stored_bytes(policies, layers) == kv_bytes(text, CONFIG, NUM_TOKENS) < kv_bytes("none", CONFIG, NUM_TOKENS)
