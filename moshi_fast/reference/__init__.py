"""The executable specification: eager PyTorch Mimi and Moshi LM with explicit streaming state.

Runs on CPU or GPU, never imports Triton or the CUDA extension, and is checked against Kyutai's
`moshi` package and transformers' implementation. Every fast module mirrors a module here and
shares its parameter names.
"""
