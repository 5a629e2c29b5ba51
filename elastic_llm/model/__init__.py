"""Model layer: Llama-family math with tensor-parallel-ready linears, weights, tokenizer, `ModelSpec`.

Submodules are imported explicitly (``from elastic_llm.model.spec import ModelSpec``) so that the
pure ones (``spec``) stay importable without torch.
"""
