"""Linear layers over dense, int8 and int4 weights, and ``build_linear``, which builds one from checkpoint tensors.

Packed layers hold their weight in one of two layouts (``layout``), chosen when they are built:
- "tiles", where the C kernels are built (``runtime/native.py``, ``runtime/csrc/qlinear.c``): 16 output rows per
  tile, each weight decoded once per call and multiplied by every activation row (``quant/tiles.py``). int4 keeps
  GGUF Q4_0/Q4_1's fp16 (d, m) exactly (``w = code · d + m``); RTN int4 chooses fp16 (d, m) itself
  (``rtn.quantize_int4_min``). Measured at 1 row, 1 thread, SmolLM2's shapes (``scripts/bench_qlinear.py``):
  1.8-2.2x faster than torch's int4 kernel per layer, 1.8x over a step's 120 layers read from DRAM, 2.8-3.0x on
  the 49152x576 int8 LM head; 1.4-2.3x at 4-16 rows.
- "torch", elsewhere (no compiler, ``LONGFIT_NATIVE=0``, shapes the tiles cannot hold), torch's kernels:
  - int8: ``torch._weight_int8pack_mm(x[M, K], codes int8 [N, K], scales[N]) -> [M, N]``, scales in x's dtype.
  - int4: ``torch._convert_weight_to_int4pack_for_cpu(codes int32 [N, K] in 0..15, 1) -> uint8 [N, K/2]`` once,
    then ``torch._weight_int4pack_mm_for_cpu(x[M, K], packed, group_size, scales_and_zeros[K/G, N, 2]) -> [M, N]``
    with ``w = (q - 8) · scale + zero``; ``scales_and_zeros`` in x's dtype.

Both torch kernels take float32 or bf16 activations, but only bf16 is fast: at M = 1 a 1536×576 weight takes ~30 µs
in bf16 and 360 µs (int8) / 980 µs (int4) in fp32, against ~45 µs for an fp32 ``F.linear``; at M = 64 the fp32
kernels are 60-170× slower than fp32 ``F.linear``. So the packed layers compute in bf16 (other activation dtypes are
cast to bf16 and back; the C kernels take bf16 only), and ``build_linear`` with ``dtype=float32`` dequantizes the
quantized weight once into an fp32 ``DenseLinear``: the same quantized values, fp32 arithmetic, exactly comparable
with a fp32 reference (transformers). Many-row products (dense layers, and packed ones from
``DEQUANTIZE_MIN_ROWS`` rows, ``TILES_DEQUANTIZE_MIN_ROWS`` in the tile layout) go through ``matmul.linear``,
which multiplies a bf16 weight in fp32 on CPUs whose bf16 GEMM is slow (AVX2-only: 100-400×).

Shape constraints, found by running the kernels (not all are checked by torch):
- int4: ``N % 16 == 0`` (checked), ``K % group_size == 0`` (checked), group ∈ {32, 64, 128, 256}; x 2-D contiguous.
- int8: ``K % 16 == 0``. NOT checked by torch: K = 24 or 40 with M > 1 returns garbage, K = 8/12/13/33 segfaults.
  x must be contiguous in its last dimension. The tile layouts also need ``N % 16 == 0``.

Error of the "auto" GGUF paths, measured on SmolLM2-135M's tensors: the Q4_1 repack with fp32 scale/zero equals
gguf's dequantization bit for bit (so does the tile layout's fp16 d/m); torch's kernel's bf16 scale/zero move a
weight by at most 4.6% of its quantization step (relative Frobenius error 0.24%, like storing the weight in bf16).
Q8_0 (per-32-block scales) requantized per channel to int8: relative Frobenius error 1.2% (bf16 storage: 0.14%),
max error half a channel step (0.39% of the row's max |w|); on the tied lm_head, logits moved by ≤ 0.56 (top-1
agreement 99.2% on embedding-like inputs).
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, Iterator, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from longfit.quant import matmul, tiles
from longfit.quant.gguf_repack import GGUF_BLOCK_SIZE, GGUF_INT4_TYPES, unpack_q4_rows
from longfit.quant.rtn import (INT4_GROUP_SIZES, dequantize_int4, dequantize_int8, quantize_int4, quantize_int4_min,
                               quantize_int8)
import longfit.runtime.native as native  # the C kernels' loader: stdlib + torch only

logger = logging.getLogger(__name__)

DENSE_FORMS = ("dense", "bf16", "bfloat16", "fp32", "float32")  # all mean "dequantize and store in dtype"
FORMS = (*DENSE_FORMS, "int8", "int4", "auto")
_FLOAT_QTYPES = ("F32", "F16", "BF16")
_KERNEL_DTYPE = torch.bfloat16  # the only activation dtype the packed kernels are fast with
INT4_N_MULTIPLE = 16
INT8_K_MULTIPLE = 16
# From this many input rows on (prefill chunks, big batches) a packed layer dequantizes its weight to bf16 and runs
# one bf16 matmul: the packed kernels reuse nothing across rows, their time grows linearly with M (measured, 1
# thread, SmolLM2's 120 layer matmuls: int4 kernel 134 ms at M=16, 514 at 64, 3955 at 512; dequantize + bf16
# matmul ~700 ms at M=16, 1056 at 512; one 3072x576 layer at M=512: kernel 70 ms, dequantize + matmul 4 ms).
DEQUANTIZE_MIN_ROWS = 64
# The tile kernels decode each weight once per call: their time per extra row is a few fused multiply-adds, and the
# dequantization (fresh each call) costs more than they do up to many rows. Measured (1 and 2 threads, SmolLM2's
# four layer shapes, dequantize + bf16 matmul vs the kernel): int4 at 256 rows 15.3 vs 10.6 ms (1 thread), at 512
# 23.6 vs 20.5; int8 at 128 rows 11.2 vs 10.7, at 192 10.9 vs 15.7. So tiles dequantize from these row counts on.
TILES_DEQUANTIZE_MIN_ROWS = {"int4": 512, "int8": 160}
# Below this many rows a bf16 dense layer's product is the C kernel over its plain weight (csrc/dense.c), which the
# layer then keeps instead of oneDNN's prepacked copy (``DenseLinear.prepack``). Measured, 1 thread, each call from
# DRAM (scripts/matmul_blocks.py --shapes 1024x640,2048x640,640x2048,49152x576 --rows 1,4,16): Gemma-3's shapes
# 0.22 / 0.32 / 0.27 ms at 1 row against 0.48 / 0.51 / 0.45 prepacked, 0.25 / 0.46 / 0.49 against 0.43 / 0.65 / 0.71
# at 16; SmolLM2's bf16 LM head 4.60 vs 4.90 at 1 row, 7.37 vs 7.29 at 16. With --rows 16,32,64,128 and
# 3072x576 as well, the kernel beat torch's product of the plain weight up to 64 rows and lost at 128 (1.17-3.12 vs
# 1.09-2.67 ms). Prompt chunks then multiply the plain weight, which oneDNN reorders on each call (docs/PERFORMANCE.md,
# "A few rows of a dense bf16 weight").
DENSE_KERNEL_MAX_ROWS = 64
# The CPU int4 kernel packs output rows in blocks whose width depends on the ISA torch dispatches to (torch 2.13:
# 64 with AVX-512, 32 with AVX2); ``_int4_cpu_block`` finds which one this machine uses (see _unpack_int4_cpu).
_INT4_BLOCK_CANDIDATES = (64, 32)


class WeightSource(Protocol):
    """What ``build_linear`` reads from a checkpoint tensor; ``longfit.models.weights.RawWeight`` fits it.

    (A protocol, not an import: ``quant/`` never imports ``models/``.)
    """

    name: str
    shape: tuple[int, ...]
    qtype: str

    def dequantize(self) -> Tensor: ...  # fp32 [out, in]

    def row_blocks(self, block_rows: int | None = None) -> Iterator[Tensor]: ...  # fp32 [rows, in] blocks, in order

    def quant_rows(self) -> np.ndarray | None: ...  # uint8 [out, bytes_per_row] of GGUF blocks, or None


class Linear(torch.nn.Module):
    """Base: ``y = x @ W.T (+ bias)``, x [..., in_features] → [..., out_features]. Inference only (buffers).

    Attributes:
        form: "dense", "int8" or "int4" (class constant).
        fallback_reason: why ``build_linear`` chose a different form than asked for, None when it did not.
    """

    form = "dense"

    def __init__(self, in_features: int, out_features: int, bias: Tensor | None, bias_dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.fallback_reason: str | None = None
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
        self.bias: Tensor | None
        self.register_buffer("bias", None if bias is None else bias.detach().to(bias_dtype).contiguous())

    def forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def weight_nbytes(self) -> int:
        """Bytes held by this layer's buffers (weights, scales, zeros, bias)."""
        return sum(buf.numel() * buf.element_size() for buf in self.buffers())

    def read_nbytes(self) -> int:
        """Bytes one product reads (``weight_nbytes`` unless the layer holds a second form of its weight)."""
        return self.weight_nbytes()

    def extra_repr(self) -> str:
        reason = f", fallback_reason={self.fallback_reason!r}" if self.fallback_reason else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}{reason}"


class DenseLinear(Linear):
    """``F.linear`` over a float weight ``[N, K]`` (bf16 or fp32); inputs of another dtype are cast to it and back.

    ``prepack()`` (the loader calls it for a model's CPU layers) replaces the plain bf16 ``weight`` buffer by
    oneDNN's blocked layout, ``packed`` (``matmul.prepack``): same results, no per-call reorder. ``weight`` is then
    None; ``dense_weight()`` rebuilds the plain one. Where the C kernels are built and ``in_features % 32 == 0``, a
    bf16 weight stays plain instead (unless the layer keeps both, as the LM head does): fewer than
    ``DENSE_KERNEL_MAX_ROWS`` rows are multiplied by ``native.bf16_linear`` (exact bf16 products, fp32 sums).
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        if weight.dim() != 2 or not weight.is_floating_point():
            raise ValueError(f"weight must be a 2-D float [out, in] tensor, got {weight.dtype} {tuple(weight.shape)}")
        super().__init__(weight.shape[1], weight.shape[0], bias, weight.dtype)
        self.weight: Tensor | None
        self.register_buffer("weight", weight.detach().contiguous())
        self.packed: Tensor | None = None  # an mkldnn tensor: not a buffer (Module.to/state_dict can't move it)

    def prepack(self, keep_plain: bool = False) -> bool:
        """Swap the plain weight for its prepacked form when ``matmul.should_prepack`` says it pays. Returns
        whether the layer is now prepacked. The plain tensor is freed unless something else holds it or
        ``keep_plain`` (then both are held: the LM head, whose plain rows serve lookups and rescoring)."""
        if self.packed is not None:
            return True
        weight = self.weight
        if weight is None or not matmul.should_prepack(weight):
            return False
        if _dense_kernel_takes(weight) and not keep_plain and not matmul.prepack_forced():
            return False  # the few-row C kernel reads the plain weight; prompt chunks multiply it as it is
        self.packed = matmul.prepack(weight)
        if not keep_plain:
            self.weight = None
        return True

    def dense_weight(self) -> Tensor:
        """The plain ``[N, K]`` weight (rebuilt from the packed form if prepacked)."""
        return self.weight if self.packed is None else self.packed.to_dense()

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight
        if weight is not None and _few_rows(x, DENSE_KERNEL_MAX_ROWS) and _dense_kernel_takes(weight):
            out = native.bf16_linear_op(x, weight) if torch.compiler.is_compiling() else native.bf16_linear(x, weight)
            return out if self.bias is None else out.add_(self.bias)
        if self.packed is not None:
            return matmul.packed_linear(x, self.packed, self.bias)
        return matmul.linear(x, weight, self.bias)  # fp32 product where this CPU's bf16 GEMM is slow

    def weight_nbytes(self) -> int:
        packed = 0 if self.packed is None else self.packed.numel() * self.packed.element_size()
        return super().weight_nbytes() + packed

    def read_nbytes(self) -> int:
        if self.packed is None:
            return self.weight_nbytes()
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return self.packed.numel() * self.packed.element_size() + bias  # the plain copy (a head's) is not read


def prepack_dense_layers(model: nn.Module, keep_plain: tuple[str, ...] = ("lm_head",),
                         after_each: Callable[[], object] | None = None) -> int:
    """``DenseLinear.prepack()`` on every dense layer of ``model``; the modules named in ``keep_plain`` hold their
    plain weight as well (the LM head: its plain weight is the embedding table, or the rows its leading logits are
    rescored from). Returns how many layers were prepacked. ``after_each`` runs after each layer that was (the
    loader returns the freed plain weight's pages to the OS there, else the packed copies pile up beside its hole).

    The head's second copy costs its bytes (SmolLM2: 56 MB) and nearly halves its product: measured on the
    project's EPYC, 1 thread (``scripts/matmul_blocks.py``), 49152×576 bf16 at 1 / 4 / 16 rows, 7.2 / 7.5 / 10.7 ms
    plain, 4.2 / 3.6 / 6.3 prepacked.
    """
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, DenseLinear) and module.prepack(keep_plain=name in keep_plain):
            count += 1
            if after_each is not None:
                after_each()
    return count


def _dense_kernel_takes(weight: Tensor) -> bool:
    """Whether ``native.bf16_linear`` (plain row-major bf16, ``csrc/dense.c``) takes this weight's few-row products."""
    return (weight.dtype == _KERNEL_DTYPE and weight.device.type == "cpu" and weight.dim() == 2
            and weight.shape[1] % 32 == 0 and weight.is_contiguous() and native.library() is not None)


def _few_rows(x: Tensor, limit: int) -> bool:
    """The decode step's case ([M, K] bf16 contiguous, fewer than ``limit`` rows) that the packed kernels take as
    it is."""
    return x.dtype == _KERNEL_DTYPE and x.dim() == 2 and x.is_contiguous() and x.shape[0] < limit


class Int8Linear(Linear):
    """Per-output-channel symmetric int8 weight, ``w[n, k] = codes[n, k] · scales[n]``, computed in bf16.

    Buffers: codes, uint8 [N/16, K/4, 64] (code + 128) in the "tiles" layout (``quant/tiles.py``; the C kernel
    of ``runtime/native.py``) or int8 [N, K] in the "torch" one (``torch._weight_int8pack_mm``); scales bf16 [N]; bias
    bf16 [N] or None. Other activation dtypes are cast to bf16 for the kernel and the output cast back (bf16
    numerics). Tests compare with ``rtn.dequantize_int8`` + matmul.
    """

    form = "int8"

    def __init__(self, codes: Tensor, scales: Tensor, bias: Tensor | None = None, layout: str | None = None) -> None:
        """Args: codes [N, K] int8; scales [N]; layout "tiles", "torch" or None (tiles where the C kernels are
        built and N % 16 == 0)."""
        if codes.dim() != 2 or codes.dtype != torch.int8:
            raise ValueError(f"codes must be int8 [out, in], got {codes.dtype} {tuple(codes.shape)}")
        n_out, n_in = codes.shape
        if n_in % INT8_K_MULTIPLE:
            # NOTE: torch does not check this; the kernel returns garbage or crashes (measured, torch 2.13 CPU).
            raise ValueError(f"in_features must be a multiple of {INT8_K_MULTIPLE} for the int8 kernel, got {n_in}")
        if tuple(scales.shape) != (n_out,):
            raise ValueError(f"scales must have shape ({n_out},), got {tuple(scales.shape)}")
        super().__init__(n_in, n_out, bias, _KERNEL_DTYPE)
        self.layout = tiles.choose_layout(layout, tiles.tile_shape_problem(n_out, n_in))
        # from this many rows on, dequantize + one matmul is faster than the kernel
        self.dequantize_min_rows = TILES_DEQUANTIZE_MIN_ROWS["int8"] if self.layout == "tiles" else DEQUANTIZE_MIN_ROWS
        self.codes: Tensor
        self.scales: Tensor
        self.register_buffer("codes", tiles.pack_int8(codes) if self.layout == "tiles" else codes.contiguous())
        self.register_buffer("scales", scales.detach().to(_KERNEL_DTYPE).contiguous())

    def plain_codes(self) -> Tensor:
        """codes [N, K] int8, whatever the layout."""
        return tiles.unpack_int8(self.codes) if self.layout == "tiles" else self.codes

    def code_abs_sums(self, block_rows: int = 4096) -> Tensor:
        """Σ_k |codes[n, k]| per output row, fp32 [N], a block of rows at a time: no temporary of the whole weight
        (the LM head's [V, d] in int32 was 113 MiB of SmolLM2's load peak). ``block_rows`` % 32 == 0 keeps the
        tile layout's pairs of tiles whole."""
        sums = torch.empty(self.out_features, dtype=torch.float32)
        for start in range(0, self.out_features, block_rows):
            if self.layout == "tiles":
                rows = tiles.unpack_int8(self.codes[start // tiles.TILE_ROWS:(start + block_rows) // tiles.TILE_ROWS])
            else:
                rows = self.codes[start:start + block_rows]
            sums[start:start + rows.shape[0]] = rows.to(torch.int16).abs().sum(1, dtype=torch.float32)
        return sums

    def _kernel(self, x: Tensor) -> Tensor:
        """x [M, K] bf16 contiguous → [M, N] bf16."""
        if self.layout == "torch":
            return torch._weight_int8pack_mm(x, self.codes, self.scales)
        if x.device.type != "cpu":
            return matmul.linear(x, self.plain_codes().to(x.dtype) * self.scales[:, None])
        if torch.compiler.is_compiling():
            return native.q8_linear_op(x, self.codes, self.scales)
        return native.q8_linear(x, self.codes, self.scales)

    def forward(self, x: Tensor) -> Tensor:
        if _few_rows(x, self.dequantize_min_rows):
            out = self._kernel(x)  # [M, N] bf16: the kernel alone, no reshape/cast dispatches
            return out if self.bias is None else out.add_(self.bias)
        flat = x.reshape(-1, self.in_features)  # [M, K]
        if flat.dtype != _KERNEL_DTYPE:
            flat = flat.to(_KERNEL_DTYPE)
        if flat.shape[0] >= self.dequantize_min_rows:
            # codes · scale is exact in fp32 (8-bit × 8-bit significands); one bf16 rounding, then a bf16 matmul.
            # Where bf16 GEMMs are slow the fp32 weight multiplies as it is (no bf16 rounding to undo).
            weight = self.plain_codes().float().mul_(self.scales.float()[:, None])  # [N, K]
            out = matmul.linear(flat, weight if matmul.slow_bf16(weight.device) else weight.to(_KERNEL_DTYPE))
        else:
            out = self._kernel(flat.contiguous())  # [M, N] bf16
        if self.bias is not None:
            out.add_(self.bias)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def _unpack_int4_cpu(packed: Tensor, out_features: int, in_features: int, block: int) -> Tensor:
    """Codes [K, N] uint8 in 0..15 from ``_convert_weight_to_int4pack_for_cpu``'s output [N, K/2] (N % block == 0).

    Layout (torch 2.13, checked at run time by ``_int4_cpu_block``): for each block of ``block`` output rows and
    each input k, ``block / 2`` bytes; byte i holds row i of the block in its low nibble and row block/2 + i in its
    high one.
    """
    half = block // 2
    blocks = packed.view(out_features // block, in_features, half).transpose(0, 1)  # [K, N/block, block/2]
    codes = torch.empty(in_features, out_features // block, 2, half, dtype=torch.uint8, device=packed.device)
    torch.bitwise_and(blocks, 15, out=codes[:, :, 0])
    torch.bitwise_right_shift(blocks, 4, out=codes[:, :, 1])
    return codes.view(in_features, out_features)


@functools.cache
def _int4_cpu_block() -> int | None:
    """The output-row block width with which this torch packs int4 weights as ``_unpack_int4_cpu`` reads them, or
    None when the layout is none of the known ones (once per process)."""
    rows = 2 * max(_INT4_BLOCK_CANDIDATES)
    generator = torch.Generator().manual_seed(0)
    probe = torch.randint(0, 16, (rows, 64), dtype=torch.int32, generator=generator)
    packed = torch._convert_weight_to_int4pack_for_cpu(probe, 1)
    block = None
    if tuple(packed.shape) == (rows, 32):
        expected = probe.t().to(torch.uint8)
        block = next((b for b in _INT4_BLOCK_CANDIDATES
                      if torch.equal(_unpack_int4_cpu(packed, rows, 64, b), expected)), None)
    if block is None:
        logger.warning("unknown int4 packed layout in torch %s: many-row int4 matmuls use the (slower) kernel",
                       torch.__version__)
    return block


class Int4Linear(Linear):
    """Group-wise asymmetric int4 weight, ``w = (code - 8) · scale + zero`` per group of ``group_size`` inputs.

    Two layouts (``layout``):
    - "tiles" (where the C kernels are built): ``packed`` uint8 [N/16, K/8, 64], and ``d``, ``m`` [N/16, K/G, 16]
      with ``w = code · d + m`` (``quant/tiles.py``), fp16 where that is exact (GGUF Q4_0/Q4_1: the file's own
      values), else fp32. The C kernel (``runtime/native.py``) multiplies by exactly these weights.
    - "torch": ``packed`` uint8 [N, K/2] (``torch._weight_int4pack_mm_for_cpu``'s layout, opaque) and
      ``scales_and_zeros`` bf16 [K/G, N, 2] (the kernel's parameter dtype: bf16 rounding of scale and zero).
    bias bf16 [N] or None. Computed in bf16 like :class:`Int8Linear`. Tests compare with the dequantized weight.
    """

    form = "int4"

    def __init__(
        self, codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int, bias: Tensor | None = None,
        layout: str | None = None,
    ) -> None:
        """Args: codes [N, K] integer in 0..15 (unpacked); scales, zeros [N, K/G] float; layout "tiles", "torch"
        or None (tiles where the C kernels are built)."""
        if codes.dim() != 2:
            raise ValueError(f"codes must be a 2-D [out, in] tensor, got shape {tuple(codes.shape)}")
        n_out, n_in = codes.shape
        problem = int4_shape_problem(n_out, n_in, group_size)
        if problem:
            raise ValueError(problem)
        if tuple(scales.shape) != (n_out, n_in // group_size) or scales.shape != zeros.shape:
            raise ValueError(
                f"scales and zeros must have shape ({n_out}, {n_in // group_size}), "
                f"got {tuple(scales.shape)} and {tuple(zeros.shape)}"
            )
        super().__init__(n_in, n_out, bias, _KERNEL_DTYPE)
        self.group_size = group_size
        self.layout = tiles.choose_layout(layout, tiles.tile_shape_problem(n_out, n_in, group_size))
        # from this many rows on, dequantize + one matmul is faster than the kernel
        self.dequantize_min_rows = TILES_DEQUANTIZE_MIN_ROWS["int4"] if self.layout == "tiles" else DEQUANTIZE_MIN_ROWS
        self.packed: Tensor
        if self.layout == "tiles":
            self.register_buffer("packed", tiles.pack_int4(codes))
            d, m = tiles.int4_params(scales, zeros)
            self.d: Tensor
            self.m: Tensor
            self.register_buffer("d", tiles.pack_lanes(d))
            self.register_buffer("m", tiles.pack_lanes(m))
            return
        packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)  # [N, K/2] uint8
        self.register_buffer("packed", packed)
        # [N, K/G, 2] → [K/G, N, 2], the kernel's layout. NOTE: zero is the value at code 8, not the group minimum.
        scales_and_zeros = torch.stack([scales.float(), zeros.float()], dim=-1).transpose(0, 1)
        self.scales_and_zeros: Tensor
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(_KERNEL_DTYPE).contiguous())

    def _kernel(self, x: Tensor) -> Tensor:
        """x [M, K] bf16 contiguous → [M, N] bf16."""
        if self.layout == "torch":
            return torch._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scales_and_zeros)
        if x.device.type != "cpu":
            return matmul.linear(x, self.dequantized_t(x.dtype).T)
        if torch.compiler.is_compiling():
            return native.q4_linear_op(x, self.packed, self.d, self.m, self.group_size)
        return native.q4_linear(x, self.packed, self.d, self.m, self.group_size)

    def forward(self, x: Tensor) -> Tensor:
        if _few_rows(x, self.dequantize_min_rows):
            out = self._kernel(x)  # [M, N] bf16: the kernel alone, no reshape/cast dispatches
            return out if self.bias is None else out.add_(self.bias)
        flat = x.reshape(-1, self.in_features)  # [M, K]
        if flat.dtype != _KERNEL_DTYPE:
            flat = flat.to(_KERNEL_DTYPE)
        if flat.shape[0] >= self.dequantize_min_rows and self._dequantizable():
            dtype = torch.float32 if matmul.slow_bf16(flat.device) else _KERNEL_DTYPE
            out = matmul.linear(flat, self.dequantized_t(dtype).T)  # [M, K] @ [K, N]
        else:
            out = self._kernel(flat.contiguous())
        if self.bias is not None:
            out.add_(self.bias)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def _dequantizable(self) -> bool:
        """Whether ``dequantized_t`` can read the weight: always in the tile layout; in torch's where its packing
        block width on this CPU is known and divides the output rows."""
        if self.layout == "tiles":
            return True
        block = _int4_cpu_block()
        return block is not None and self.out_features % block == 0

    def dequantized_t(self, dtype: torch.dtype = _KERNEL_DTYPE) -> Tensor:
        """The weight the kernel multiplies by, transposed: [K, N] in ``dtype`` (a fresh tensor; bf16: rounded once).

        Computed in fp32 from the layout's own parameters (tiles: ``code · d + m``; torch: ``(code - 8) · scale +
        zero`` from the bf16 parameters, ``zero - 8·scale`` exact in fp32), so in bf16 it differs from the
        kernel's product only by bf16 rounding, like a dense bf16 layer.
        """
        if (self.layout == "tiles" and self.packed.device.type == "cpu" and dtype in (torch.bfloat16, torch.float32)
                and native.library() is not None and not torch.compiler.is_compiling()):
            # The same expression in C, from the tiles straight to [N, K] (a prompt chunk's int4 products dequantize
            # every weight once per step: 2.8 ms for a 3072x576 layer through the torch ops below, 2 threads).
            return native.q4_dequantize(self.packed, self.d, self.m, self.group_size, dtype).T
        groups, size = self.in_features // self.group_size, self.group_size
        if self.layout == "tiles":
            codes = tiles.unpack_int4(self.packed).T  # [K, N] uint8
            scales = tiles.unpack_lanes(self.d).float().T  # [K/G, N]
            shifts = tiles.unpack_lanes(self.m).float().T
        else:
            if not self._dequantizable():
                raise RuntimeError(f"int4 packed layout of torch {torch.__version__} on this CPU is not known for "
                                   f"{self.out_features} output rows: use the kernel (forward) instead")
            codes = _unpack_int4_cpu(self.packed, self.out_features, self.in_features, _int4_cpu_block())  # [K, N]
            scales = self.scales_and_zeros[..., 0].float()  # [K/G, N]
            shifts = self.scales_and_zeros[..., 1].float() - 8 * scales
        weight = codes.reshape(groups, size, self.out_features).float().mul_(scales[:, None]).add_(shifts[:, None])
        return weight.view(self.in_features, self.out_features).to(dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}, layout={self.layout}"


def int4_shape_problem(out_features: int, in_features: int, group_size: int) -> str | None:
    """Why the int4 kernel cannot take an ``[out, in]`` weight with this group size, or None if it can."""
    if group_size not in INT4_GROUP_SIZES:
        return f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size}"
    if out_features % INT4_N_MULTIPLE:
        return f"the int4 kernel needs out_features % {INT4_N_MULTIPLE} == 0, got {out_features}"
    if in_features % group_size:
        return f"the int4 kernel needs in_features % group_size == 0, got {in_features} % {group_size}"
    return None


def int8_shape_problem(in_features: int) -> str | None:
    """Why the int8 kernel cannot take a weight with ``in_features`` inputs, or None if it can."""
    if in_features % INT8_K_MULTIPLE:
        return f"the int8 kernel needs in_features % {INT8_K_MULTIPLE} == 0, got {in_features}"
    return None


def _int4_group_for(in_features: int, group_size: int) -> int | None:
    """The largest kernel group size ≤ ``group_size`` dividing ``in_features`` (finer groups: never less accurate)."""
    fitting = [g for g in INT4_GROUP_SIZES if g <= group_size and in_features % g == 0]
    return max(fitting) if fitting else None


def _plan(
    qtypes: set[str], form: str, out_features: int, in_features: int, group_size: int
) -> tuple[str, int, str | None]:
    """Choose the layer kind: ("dense" | "int8" | "int4_rtn" | "int4_gguf", group size, fallback reason or None)."""
    int8_problem = int8_shape_problem(in_features)
    all_q4 = qtypes <= set(GGUF_INT4_TYPES)
    if form == "dense":
        return "dense", 0, None
    if form == "auto":
        if all_q4:
            problem = int4_shape_problem(out_features, in_features, GGUF_BLOCK_SIZE)
            return ("dense", 0, f"auto: {problem}; kept dense") if problem else ("int4_gguf", GGUF_BLOCK_SIZE, None)
        if qtypes == {"Q8_0"}:
            return ("dense", 0, f"auto: {int8_problem}; kept dense") if int8_problem else ("int8", 0, None)
        if qtypes <= set(_FLOAT_QTYPES):
            return "dense", 0, None
        return "dense", 0, f"auto: no packed form keeps {'/'.join(sorted(qtypes))} exactly; dense"
    if form == "int4":
        if all_q4 and not int4_shape_problem(out_features, in_features, GGUF_BLOCK_SIZE):
            reason = (
                None if group_size == GGUF_BLOCK_SIZE else f"int4: kept the file's exact group of 32, not {group_size}"
            )
            return "int4_gguf", GGUF_BLOCK_SIZE, reason
        group = _int4_group_for(in_features, group_size)
        problem = int4_shape_problem(out_features, in_features, group or group_size)
        if problem is None and group is not None:
            if group == group_size:
                return "int4_rtn", group, None
            return "int4_rtn", group, f"int4: group_size {group_size} does not divide {in_features}; used {group}"
        if int8_problem is None:
            return "int8", 0, f"int4: {problem}; used int8"
        return "dense", 0, f"int4: {problem}; {int8_problem}; kept dense"
    assert form == "int8", form
    return ("dense", 0, f"int8: {int8_problem}; kept dense") if int8_problem else ("int8", 0, None)


def convert_rows(parts: list[WeightSource], convert: Callable[[Tensor], tuple[Tensor, ...]],
                 block_rows: int | None = None) -> tuple[Tensor, ...]:
    """``convert`` (a dtype cast, an RTN quantizer: its outputs for a row depend on that row alone) over the parts'
    fp32 row blocks (``row_blocks``), stacked along the rows into outputs allocated once. Equal to converting the
    stacked fp32 matrix, which is never held whole (the tied LM head's was SmolLM2's load peak: 113 MiB in fp32 plus
    two temporaries of its size). One part read in one block is converted as it is."""
    outs: tuple[Tensor, ...] = ()
    start = 0
    for part in parts:
        for block in part.row_blocks(block_rows):
            results = convert(block)
            if len(parts) == 1 and tuple(block.shape) == tuple(part.shape):
                return results
            if not outs:
                total = sum(p.shape[0] for p in parts)
                outs = tuple(torch.empty((total, *r.shape[1:]), dtype=r.dtype) for r in results)
            for out, result in zip(outs, results):
                out[start:start + block.shape[0]] = result
            start += block.shape[0]
    return outs


def dequantized(parts: list[WeightSource], dtype: torch.dtype = torch.float32, block_rows: int | None = None) -> Tensor:
    """[sum(out), in] in ``dtype``: the parts dequantized and stacked along the output dimension, by row blocks
    (``convert_rows``: no whole fp32 copy on the way to ``dtype``)."""
    return convert_rows(parts, lambda block: (block.to(dtype),), block_rows)[0]


def _gguf_int4(parts: list[WeightSource], in_features: int) -> tuple[Tensor, Tensor, Tensor]:
    """Exact (codes [N, K] uint8, scales [N, K/32] fp32, zeros [N, K/32] fp32) of Q4_0/Q4_1 parts, stacked."""
    unpacked = []
    for part in parts:
        rows = part.quant_rows()
        if rows is None:
            raise ValueError(f"{part.name}: qtype {part.qtype} but no quantized rows to repack")
        unpacked.append(unpack_q4_rows(rows, part.qtype, in_features))
    codes, scales, zeros = (torch.cat(pieces, dim=0) for pieces in zip(*unpacked))
    return codes, scales, zeros


def _validate(parts: list[WeightSource], form: str, dtype: torch.dtype, group_size: int) -> None:
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"dtype must be torch.bfloat16 or torch.float32 (never fp16 on CPU), got {dtype}")
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    if not parts:
        raise ValueError("parts must be a non-empty list of [out, in] weights")
    for part in parts:
        if len(part.shape) != 2 or part.shape[1] != parts[0].shape[1]:
            raise ValueError(
                f"parts must be 2-D [out, in] with the same in_features; {part.name} has shape {part.shape}, "
                f"{parts[0].name} has {parts[0].shape}"
            )


def build_linear(
    parts: list[WeightSource], bias: Tensor | None, form: str, dtype: torch.dtype, group_size: int = 32
) -> Linear:
    """Build one linear layer from checkpoint weights fused along the output dimension.

    Args:
        parts: weights [N_i, K] (e.g. q/k/v or gate/up projections), concatenated into one [sum N_i, K] layer.
        bias: [sum N_i] or None (already concatenated).
        form: one of :data:`FORMS`. Dense forms store the dequantized weight in ``dtype``. "int8": RTN per output
            channel. "int4": RTN per group of ``group_size`` (Q4_0/Q4_1 parts are repacked exactly with the
            file's group of 32 instead). "auto": keep the file's precision: Q4_0/Q4_1 → exact int4 repack, Q8_0 →
            int8 (requantized per channel from the dequantized weight), anything else → dense; with float32
            activations "auto" is the file's exact dequantization (dense).
        dtype: activation dtype, torch.bfloat16 or torch.float32. With float32, a quantized form is dequantized once
            into an fp32 :class:`DenseLinear` (same quantized values, fp32 math; the packed kernels are 10-170×
            slower with fp32 activations than fp32 ``F.linear``, see the module docstring).
        group_size: int4 group size, one of 32/64/128/256; a smaller one dividing K is used when it does not.

    Returns:
        The layer; ``fallback_reason`` says why its form differs from the one asked for (shape constraints, mixed
        GGUF types, float32), None otherwise.

    Raises:
        ValueError: unknown form, dtype or group size; parts of different in_features; bias of the wrong shape.
    """
    _validate(parts, form, dtype, group_size)
    out_features = sum(part.shape[0] for part in parts)
    in_features = parts[0].shape[1]
    requested = "dense" if form in DENSE_FORMS else form
    if requested == "auto" and dtype == torch.float32:
        # fp32 activations dequantize any packed form anyway; "keep the file's precision" is then the file's own
        # dequantization, exactly (an int8 requantization of Q8_0 would only lose accuracy, never time).
        requested = "dense"
    kind, group, reason = _plan({part.qtype for part in parts}, requested, out_features, in_features, group_size)

    layer: Linear
    if kind == "dense":
        layer = DenseLinear(dequantized(parts, dtype), bias)
    elif dtype == torch.float32:
        # The quantized values in exact fp32 arithmetic (param_dtype fp32: no bf16 rounding of scales).
        if kind == "int4_gguf":
            weight = dequantized(parts)  # gguf's dequantization equals the exact repack
        elif kind == "int4_rtn":
            weight = dequantize_int4(*quantize_int4(dequantized(parts), group), group)
        else:
            weight = dequantize_int8(*quantize_int8(dequantized(parts)))
        layer = DenseLinear(weight, bias)
        note = f"float32 activations: {kind} weights dequantized once into a float32 dense layer"
        reason = f"{reason}; {note}" if reason else note
    elif kind == "int4_gguf":
        layer = Int4Linear(*_gguf_int4(parts, in_features), GGUF_BLOCK_SIZE, bias)
    elif kind == "int4_rtn" and tiles.default_layout(tiles.tile_shape_problem(out_features, in_features, group)) \
            == "tiles":
        # fp16 (d, m) chosen by the quantizer: the tile kernel's cheaper parameters, exact
        layer = Int4Linear(*convert_rows(parts, lambda w: quantize_int4_min(w, group)), group, bias, "tiles")
    elif kind == "int4_rtn":
        layer = Int4Linear(*convert_rows(parts, lambda w: quantize_int4(w, group, _KERNEL_DTYPE)), group, bias)
    else:
        layer = Int8Linear(*convert_rows(parts, lambda w: quantize_int8(w, _KERNEL_DTYPE)), bias)
    layer.fallback_reason = reason
    if reason:
        logger.debug("build_linear(%s, form=%s): %s", "+".join(p.name for p in parts), form, reason)
    return layer
