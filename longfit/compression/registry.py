"""Method name → policy class; builds the policies of a parsed spec. The one place untyped parameters exist."""

from __future__ import annotations

from typing import Any

from longfit.compression.base import CompressionPolicy
from longfit.compression.chunkkv import ChunkKVPolicy
from longfit.compression.duo_attention import DuoAttentionPolicy
from longfit.compression.h2o import H2OPolicy
from longfit.compression.knorm import KnormPolicy
from longfit.compression.kv_quant import Int8Policy, KIVIPolicy, KVQuantPolicy
from longfit.compression.merging import MiniCachePolicy
from longfit.compression.pyramidkv import PyramidKVPolicy
from longfit.compression.quest import QuestPolicy
from longfit.compression.shadowkv import ShadowKVPolicy
from longfit.compression.snapkv import SnapKVPolicy
from longfit.compression.head_scores import read_head_scores, require_heads_path
from longfit.compression.spec import METHODS, CompressionSpec, StageSpec, parse_spec
from longfit.compression.streaming_llm import StreamingLLMPolicy
from longfit.compression.think import ThinKPolicy
from longfit.compression.tova import TOVAPolicy

_POLICIES: dict[str, type[CompressionPolicy]] = {cls.name: cls for cls in (
    StreamingLLMPolicy, H2OPolicy, SnapKVPolicy, ChunkKVPolicy, PyramidKVPolicy, TOVAPolicy, KnormPolicy,
    DuoAttentionPolicy, ThinKPolicy, ShadowKVPolicy, MiniCachePolicy, QuestPolicy, KIVIPolicy, Int8Policy,
    KVQuantPolicy,
)}
assert set(_POLICIES) == set(METHODS), "every spec method needs a policy class and vice versa"


def registered_policies() -> tuple[str, ...]:
    """Canonical method names, in descriptor order."""
    return tuple(METHODS)


def policy_class(name: str) -> type[CompressionPolicy]:
    """Policy class of a canonical method name."""
    return _POLICIES[name]


def build_stage(stage: StageSpec) -> CompressionPolicy:
    """The policy object of one validated stage."""
    params: dict[str, Any] = {k: v for k, v in stage.params if v is not None}
    if stage.name == "duo_attention":
        params["head_scores"] = read_head_scores(require_heads_path(params)).scores
        del params["heads"]
    return _POLICIES[stage.name](**params)


def build_policy(spec: CompressionSpec | str | None) -> list[CompressionPolicy]:
    """Policies of a spec (string or parsed), in application order; empty for no compression."""
    return [build_stage(stage) for stage in parse_spec(spec).stages]
