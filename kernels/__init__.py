"""Triton kernels, installed as `moshi_fast.kernels` (never import this folder as `kernels`: a
different PyPI package has that name).

One file per op: a docstring with shapes and the byte/FLOP floor, `<op>_ref` in torch, the
`_<op>_kernel` Triton kernel, and the launcher `<op>(..., out=None)`. `moshi_fast.ops` is the only
caller.
"""
