"""The CuPy kernel objects without a GPU: they construct, and the CUDA source that CuPy generates
from them compiles with NVRTC for sm_90 (where NVRTC is installed).

The code generation uses CuPy internals (``cupy._core._kernel`` / ``_reduction``); where they
differ from CuPy 13/14 the compile tests skip with a reason. ``test_cupy_gpu.py`` launches the
kernels for real on a GPU.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from isreshape_cupy import kernels


def _import_cupy():
    # A folder named cupy on sys.path would import as a namespace package: require the real one.
    spec = importlib.util.find_spec("cupy")
    if spec is None or spec.origin is None:
        pytest.skip("CuPy is not installed (pip install cupy-cuda12x)")
    import cupy

    return cupy


def test_kernel_objects_construct_without_gpu():
    cupy = _import_cupy()
    rk = kernels.row_stats_kernel()
    ek = kernels.token_grad_kernel()
    assert isinstance(rk, cupy.ReductionKernel) and isinstance(ek, cupy.ElementwiseKernel)
    assert [p.name for p in rk.out_params] == list(kernels.ROW_STATS_OUT_NAMES)
    assert [p.name for p in rk.in_params] == ["lp", "lq", "r", "m", "geometric"]
    assert rk.reduce_type == "isr_row_stats" and rk.name == "isreshape_row_stats"
    assert [p.name for p in ek.in_params] == ["m", "s"] and ek.nout == 1
    # Each output named in the post-map expression is assigned exactly once.
    for name in kernels.ROW_STATS_OUT_NAMES:
        assert kernels.ROW_STATS_POST.count(f"{name} = ") == 1


def _nvrtc_compiler(cupy):
    try:
        from cupy._core import core
        from cupy.cuda import compiler

        include = core._get_header_dir_path()
        headers = "".join(f"#include <{h}>\n" for h in core._cupy_header_list)
        options = (f"-I{include}", *core._get_cccl_include_options(), "--std=c++17")
        program_cls = compiler._NVRTCProgram
    except (ImportError, AttributeError) as exc:  # pragma: no cover - other CuPy versions
        pytest.skip(f"CuPy's compiler internals differ from CuPy 13/14: {exc}")

    def compile_(source: str) -> str:
        program = program_cls(headers + source, "isreshape_kernel.cu")
        ptx, _ = program.compile((*options, "-arch=compute_90"))
        return ptx.decode() if isinstance(ptx, bytes) else ptx

    try:
        compile_('extern "C" __global__ void probe() {}')
    except Exception as exc:  # NVRTC library missing: not a failure of our kernels
        pytest.skip(f"NVRTC is not usable here ({type(exc).__name__}: {exc})")
    return compile_


def _reduction_source(cupy, kernel, dtype, map_expr=None):
    """The CUDA source CuPy generates for the row-stats kernel on (B, T) arrays of ``dtype``."""
    try:
        from cupy._core import _carray, _kernel, _reduction, _scalar

        in_types = (dtype, dtype, dtype, np.bool_, None)
        out_types = (dtype,) * kernel.nout
        _, _, type_map = _kernel._decide_params_type(
            kernel.in_params, kernel.out_params, in_types, out_types
        )
        type_map = _kernel._TypeMap((*type_map._pairs, ("IndexT", np.int32)))

        def nd(dt, ndim):
            return _kernel._ArgInfo(1, cupy.ndarray, dt, ndim, True, True)

        scalar = _kernel._ArgInfo(3, _scalar.CScalar, np.int32, 0, True, True)
        arginfos = (
            nd(dtype, 2), nd(dtype, 2), nd(dtype, 2), nd(np.bool_, 2), scalar,
            *[nd(dtype, 1)] * kernel.nout,
            _kernel._ArgInfo(2, _carray.Indexer, None, 2, True, True),
            _kernel._ArgInfo(2, _carray.Indexer, None, 1, True, True),
            scalar,
        )  # fmt: skip
        return _reduction._ReductionKernel_get_cached_function_code(
            kernel.nin, kernel.nout, kernel._params, arginfos, type_map, kernel.name, 512,
            kernel.reduce_type, kernel.identity, map_expr or kernel.map_expr,
            kernel.reduce_expr, kernel.post_map_expr, kernel.preamble, (),
        )  # fmt: skip
    except (ImportError, AttributeError, TypeError, ValueError) as exc:  # pragma: no cover
        pytest.skip(f"CuPy's code-generation internals differ from CuPy 13/14: {exc}")


def _elementwise_source(cupy, kernel, dtype):
    try:
        from cupy._core import _carray, _kernel

        _, _, type_map = _kernel._decide_params_type(
            kernel.in_params, kernel.out_params, (np.bool_, dtype), (dtype,)
        )
        arginfos = (
            _kernel._ArgInfo(1, cupy.ndarray, np.bool_, 2, True, True),
            _kernel._ArgInfo(1, cupy.ndarray, dtype, 2, True, True),
            _kernel._ArgInfo(1, cupy.ndarray, dtype, 2, True, True),
            _kernel._ArgInfo(2, _carray.Indexer, None, 2, True, True),
        )
        return _kernel._get_elementwise_kernel_code(
            arginfos, type_map, kernel.params, kernel.operation, kernel.name, kernel.preamble
        )
    except (ImportError, AttributeError, TypeError, ValueError) as exc:  # pragma: no cover
        pytest.skip(f"CuPy's code-generation internals differ from CuPy 13/14: {exc}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_row_stats_kernel_compiles_with_nvrtc(dtype):
    cupy = _import_cupy()
    compile_ = _nvrtc_compiler(cupy)
    source = _reduction_source(cupy, kernels.row_stats_kernel(), dtype)
    assert "isr_row_stats_map(m, (double)lp, (double)lq, (double)r)" in source
    ptx = compile_(source)
    assert ".entry isreshape_row_stats" in ptx
    # The harness does catch errors: a misspelt helper must fail to compile.
    broken = _reduction_source(
        cupy, kernels.row_stats_kernel(), dtype, map_expr="isr_row_stats_mapp(m, lp, lq, r)"
    )
    with pytest.raises(Exception, match="isr_row_stats_mapp"):
        compile_(broken)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_token_grad_kernel_compiles_with_nvrtc(dtype):
    cupy = _import_cupy()
    compile_ = _nvrtc_compiler(cupy)
    source = _elementwise_source(cupy, kernels.token_grad_kernel(), dtype)
    assert kernels.TOKEN_GRAD_BODY in source
    assert ".entry isreshape_token_grad" in compile_(source)
