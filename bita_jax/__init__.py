"""bita_jax: lossless speculative decoding (BiTA, SPACE's chain) for LLaMA and Falcon in JAX.

    import bita_jax
    llm = bita_jax.load("smollm2-135m")              # model, its shipped adapter, tree="auto"
    out = llm.generate("Explain what a hash map is.", max_new_tokens=64)
    print(out.text, out.tokens_per_step)

The package is layered, dependencies pointing down:

    api           load() and LLM.generate(): the one-call entry point (this module re-exports it)
    eval          benchmarks, tree selection, the speed report
    training      samples, loss, optax steps, the resumable loop, run configs
    data          prompt sources and splits, self-distillation, the tfds dataset
    decoding      the jitted engine: plain and BiTA decoding, trees, sampling
    checkpoints   HF / GGUF import, tokenizers, load_model
    sharding, distributed   logical-axis rules and meshes; multi-process start-up
    models        LLaMA and Falcon as pure functions of (base params, BiTA params)

`load`, `LLM` and `Completion` are imported on first use, so `import bita_jax.models` stays light.
"""

__version__ = "0.1.0"
__all__ = ["LLM", "Completion", "load"]


def __getattr__(name: str):
    if name in __all__:
        from bita_jax import api

        return getattr(api, name)
    raise AttributeError(f"module 'bita_jax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
