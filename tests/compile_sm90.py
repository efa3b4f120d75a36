"""Compile every Triton kernel for an H100/H200 (sm_90) without a GPU: catches what the interpreter lets through
(non-constexpr globals, type errors in code paths it runs loosely). Run as a script, without TRITON_INTERPRET."""

from __future__ import annotations

import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from chunkattn.attention import triton_tpp
from chunkattn.cache import triton_store

DATA_PTRS = {"q_ptr", "k_ptr", "v_ptr", "out_ptr", "k_cache_ptr", "v_cache_ptr"}
FP32_PTR_PREFIXES = ("o_", "m_", "l_", "lse")


def signature(fn, dtype: str, constexprs: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + dtype if name in DATA_PTRS else "*fp32" if name.startswith(FP32_PTR_PREFIXES) else "*i64"
        else:
            sig[name] = "fp32" if name == "qk_scale" else "i64"
    return sig


def compile_all(dtypes: list[str], head_dims: list[int]) -> int:
    target = GPUTarget("cuda", 90, 32)
    count = 0
    for dtype in dtypes:
        for head_dim in head_dims:
            for group, block_m, fuse in ((1, 16, True), (4, 64, False)):
                common = dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=64,
                              DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", FUSE_MERGE=fuse)
                for fn in (triton_tpp._chunk_first_kernel, triton_tpp._seq_first_kernel):
                    consts = {k: v for k, v in common.items() if k in fn.arg_names}
                    triton.compile(ASTSource(fn=fn, signature=signature(fn, dtype, consts), constexprs=consts),
                                   target=target)
                    count += 1
            for fn, consts in ((triton_tpp._merge_kernel, dict(HEAD_DIM=head_dim, BLOCK_H=16)),
                               (triton_store._store_kernel, dict(HEAD_DIM=head_dim, BLOCK_H=4))):
                triton.compile(ASTSource(fn=fn, signature=signature(fn, dtype, consts), constexprs=consts),
                               target=target)
                count += 1
    return count


if __name__ == "__main__":
    print(f"compiled {compile_all(sys.argv[1].split(','), [int(d) for d in sys.argv[2].split(',')])} kernels")
