"""Model layer: shapes, the paged-attention forward pass, tokenizers and weight loading.

Import from the submodules (radixserve.model.loader, .attention, ...); this package module
stays import-light so `import radixserve.model` does not pull in torch.
"""
