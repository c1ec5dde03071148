"""The Python API: one call to load a model with its adapter, one to generate.

    import bita_jax
    llm = bita_jax.load("smollm2-135m")                  # model, shipped adapter, tree="auto"
    out = llm.generate("Explain what a hash map is.", max_new_tokens=64)
    print(out.text, out.tokens_per_step)                 # also out.token_ids, out.seconds
    ref = llm.generate("Explain what a hash map is.", max_new_tokens=64, use_bita=False)
    assert ref.token_ids == out.token_ids                # lossless: plain greedy, token for token

`load` takes every model spec the command-line tools take (a built-in name, a HF model directory
or a .gguf file) and every adapter spec (`default`, a directory, `random:SEED[:M]`, `none`).
`generate` takes one prompt or a list (one batch), greedy by default or sampling knobs and a
seed, and an `on_text` callback that streams the text as it is decoded. Each engine is compiled
once per shape and reused by later calls.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.sharding import Mesh

from bita_jax import models, sharding
from bita_jax.checkpoints import loading
from bita_jax.decoding import ar, bita_step, ngram
from bita_jax.decoding.engine import Engine, GenerationResult, decode_layout
from bita_jax.decoding.fallback import Fallback
from bita_jax.decoding.sampling import SamplingParams
from bita_jax.decoding.tree import Tree, auto_tree_name
from bita_jax.models.bita_params import BitaConfig, decoding_params


@dataclasses.dataclass
class Completion:
    """One prompt's generation.

    Attributes:
      text: the decoded new tokens (special tokens skipped).
      token_ids: the new token ids (the EOS included when one ended the text).
      prompt_tokens: length of the prompt after the chat template.
      steps: model calls after the prefill while this prompt was being decoded.
      tokens_per_step: new tokens per such call, the prefill's token excluded (1.0 for plain
        decoding; BiTA's drafts raise it).
      seconds: wall time of the call that produced it (the whole batch), compilation excluded.
      compile_seconds: time spent compiling in that call (0 once the shapes were seen).
      finish_reason: "eos" (an end-of-text token) or "length" (max_new_tokens reached).
      mode: "bita", "space" (the adapter's method) or "plain", with "-sampled" when
        temperature > 0.
      tree: the BiTA tree's name, or None for plain decoding.
      plain_steps: of the batch's steps, those run as plain steps where the drafts did not pay
        (`load(..., fallback=True)` with `tree="auto"`).
    """

    text: str
    token_ids: list[int]
    prompt_tokens: int
    steps: int
    tokens_per_step: float
    seconds: float
    compile_seconds: float
    finish_reason: str
    mode: str
    tree: str | None
    plain_steps: int = 0

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def tokens_per_second(self) -> float:
        return len(self.token_ids) / self.seconds if self.seconds > 0 else 0.0


class LLM:
    """A base model with its tokenizer and, optionally, BiTA params and a draft tree.

    Build one with `bita_jax.load`. Attributes: `name`, `cfg` (ModelConfig), `params` (base
    pytree), `tokenizer`, `bita_params` and `bita_config` (None without an adapter), `tree` (None
    without an adapter), `adapter` (the adapter directory, `random:...` or "none"), `method`
    ("bita", "space", or None without an adapter), `fallback` (whether `tree="auto"` decoding
    switches to plain steps where the drafts do not pay: True, False, or None for prompts past
    chat length only).

    A SPACE adapter fine-tunes the model: `params` are then the base weights with its LoRA
    merged, and plain decoding (`use_bita=False`) is that fine-tuned model's greedy decoding,
    the one SPACE's chain decoding equals.
    """

    def __init__(self, loaded: loading.LoadedModel, bita_params=None,
                 bita_config: BitaConfig | None = None, tree: Tree | None = None,
                 adapter: str = "none", max_cache: int | None = None, mesh: Mesh | None = None,
                 fallback: bool | None = None, ngram_table: ngram.NgramTable | None = None):
        if (bita_params is None) != (tree is None):
            raise ValueError("BiTA params and a tree go together: pass both or neither")
        # Decoding's layout (unrolled on CPU; on a mesh, the sharded params as loaded), kept
        # once: the engines reuse it. The fingerprint is the checkpoint's, taken before the
        # layout changes.
        self.mesh = mesh if mesh is not None and mesh.size > 1 else None
        fingerprint = loaded.identity()["fingerprint"]
        base = loaded.params
        if bita_config is not None:  # SPACE: the fine-tuned model (LoRA merged) and its masks
            base, bita_params = decoding_params(base, bita_params, bita_config)
        params = base if self.mesh is not None else decode_layout(base)
        self.loaded = dataclasses.replace(loaded, params=params, fingerprint=fingerprint)
        self.name, self.cfg, self.params = loaded.name, loaded.cfg, self.loaded.params
        self.tokenizer = loaded.tokenizer
        self.bita_params, self.bita_config, self.tree = bita_params, bita_config, tree
        self.adapter = adapter
        self.ngram_table = ngram_table  # the adapter's table for retrieval branches, or None
        self.method = bita_config.method if bita_config is not None else None
        self.max_cache = max_cache
        self.fallback = fallback
        self.tree_choice = None  # `auto_tree.Choice` when `--tree auto` chose by measurement
        self.auto = None  # (acceptance statistics, candidates, cost curve) of `--tree auto`
        self._choices: dict[int, Any] = {}  # context bucket -> `auto_tree.Choice`
        self._engines: dict[Any, Engine] = {}  # (tree name, Fallback) or None (plain) -> engine

    def __repr__(self) -> str:
        bita = f"adapter={self.adapter!r}, tree={self.tree.name!r}" if self.tree else "no adapter"
        return f"LLM({self.name!r}, {self.cfg.arch}, {self.cfg.dtype}, {bita})"

    @property
    def has_bita(self) -> bool:
        return self.tree is not None

    def tree_for(self, prompt_tokens: int) -> Tree | None:
        """The tree that decodes prompts of `prompt_tokens` tokens, None for plain decoding.

        A fixed tree always; `tree="auto"` chooses per context bucket (`auto_tree.CONTEXTS`)
        from this machine's step costs at that many cached tokens (a step's extra query rows
        also read the whole cache). For prompts longer than a chat's (buckets past
        `auto_tree.CONTEXT`) it returns None where no tree predicts `auto_tree.MIN_SPEEDUP`
        over plain greedy (on the 2-core CPU, `chain@1` is predicted 1.11 to 1.17x at 1,000 to
        4,000 tokens, so it stays; docs/benchmarks.md). Chat-length
        prompts keep the tree chosen at load, so a curve measured once on a busy machine
        (cached for good) cannot switch drafting off for them. Past chat length the retrieval
        branches are not candidates: their acceptance comes from chat answers, and on 2,000-token
        prompts `chain@1+lookup:2` accepted 1.47 tokens per step where the replay predicted
        2.03 (docs/benchmarks.md)."""
        if self.auto is None:
            return self.tree
        from bita_jax.eval import auto_tree

        bucket = auto_tree.context_bucket(prompt_tokens)
        if bucket not in self._choices:
            stats, trees, curve = self.auto
            if bucket != auto_tree.CONTEXT:  # chat-calibrated lookup acceptance does not carry
                trees = [t for t in trees if not t.lookup]
            self._choices[bucket] = auto_tree.choose(trees, stats, curve.at(bucket))
        choice = self._choices[bucket]
        return choice.tree if choice.beats_greedy or bucket == auto_tree.CONTEXT else None

    def auto_choice(self, prompt_tokens: int):
        """`tree="auto"`'s `auto_tree.Choice` for prompts of `prompt_tokens` tokens (every
        candidate's prediction at that context bucket), or None for a fixed tree."""
        if self.auto is None:
            return None
        self.tree_for(prompt_tokens)
        from bita_jax.eval import auto_tree

        return self._choices[auto_tree.context_bucket(prompt_tokens)]

    def fallback_for(self, prompt_tokens: int | None = None) -> Fallback | None:
        """The switch to plain steps for prompts of `prompt_tokens` tokens (None: chat length):
        with `tree="auto"`, at the chosen tree's measured break-even (its step cost over a plain
        step's at that context, `auto_tree.Choice.break_even`), when `fallback` is True, or is
        None and the prompt is past chat length (its context bucket is not
        `auto_tree.CONTEXT`: there the chat-calibrated acceptance may not hold); else None."""
        if self.auto is None or self.fallback is False:
            return None
        from bita_jax.eval import auto_tree

        n = auto_tree.CONTEXT if prompt_tokens is None else prompt_tokens
        if self.fallback is None and auto_tree.context_bucket(n) == auto_tree.CONTEXT:
            return None
        return Fallback(break_even=round(self.auto_choice(n).break_even, 3))

    def engine(self, use_bita: bool = True, prompt_tokens: int | None = None) -> Engine:
        """The jitted engine: BiTA when `use_bita` and an adapter is loaded, else plain. With
        `tree="auto"`, the tree (or plain decoding) chosen for prompts of `prompt_tokens`
        tokens (`tree_for`; None: the tree chosen at load, for chat-length prompts), switching
        to plain steps where its drafts do not pay (`fallback_for`)."""
        tree = fallback = None
        if use_bita and self.has_bita:
            tree = self.tree if prompt_tokens is None else self.tree_for(prompt_tokens)
        if tree is not None:
            fallback = self.fallback_for(prompt_tokens)
        key = None if tree is None else (tree.name, fallback)
        if key not in self._engines:
            if tree is not None:
                self._engines[key] = bita_step.BitaGenerator(
                    self.cfg, self.params, self.bita_params, tree, max_cache=self.max_cache,
                    mesh=self.mesh, fallback=fallback, ngram_table=self.ngram_table)
            else:
                self._engines[key] = ar.Generator(self.cfg, self.params,
                                                  max_cache=self.max_cache, mesh=self.mesh)
        return self._engines[key]

    def encode(self, prompt: str, chat: bool = True, system: str | None = None) -> list[int]:
        """Prompt ids: the chat template around one user turn (`chat`), or the raw text."""
        if not isinstance(prompt, str):
            raise TypeError(f"a prompt is a string, got {type(prompt).__name__}")
        if chat:
            return list(self.tokenizer.chat_ids(prompt, system))
        return list(self.tokenizer.encode(prompt))

    def generate(self, prompt: str | Sequence[str], max_new_tokens: int = 256, *,
                 use_bita: bool = True, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, chat: bool = True,
                 system: str | None = None,
                 on_text: Callable[..., None] | None = None) -> Completion | list[Completion]:
        """Generates a continuation of one prompt, or of a list of prompts as one batch.

        Args:
          prompt: a string, or a list of strings (decoded together, one batch).
          max_new_tokens: at most this many new tokens per prompt (an EOS stops one earlier).
          use_bita: decode with the adapter (lossless: greedy output equals plain greedy
            decoding); False, or no adapter loaded, runs plain decoding. With `tree="auto"` the
            tree follows the longest prompt's length (`tree_for`), plain decoding where no
            tree is predicted to be faster.
          temperature, top_k, top_p: 0 (the default) is greedy; above 0 samples, with top-k
            (0: off) and top-p (1: off). BiTA sampling is exact speculative sampling: each
            token follows the model's own sampling distribution.
          seed: PRNG seed of the sampling.
          chat: wrap each prompt in the model's chat template (False: the raw text).
          system: the chat's system prompt (None: the template's own default).
          on_text: streams the text as it is decoded: called with each new piece of text
            (`on_text(piece)`) for one prompt, and with `(piece, index)` for a list.

        Returns:
          A `Completion` for a string prompt, a list of them for a list.

        Raises:
          GenerationError: an empty prompt, or prompt + max_new_tokens longer than the cache.
          ValueError: bad sampling knobs.
        """
        single = isinstance(prompt, str)
        texts = [prompt] if single else list(prompt)
        if not texts:
            raise ValueError("no prompt given: pass a string or a non-empty list of strings")
        sp = SamplingParams.make(temperature, top_k, top_p)
        ids = [self.encode(t, chat, system) for t in texts]
        longest = max(len(i) for i in ids)
        if self.auto is not None:  # a request that cannot fit fails before any curve is timed
            self.engine(use_bita=False).shapes([len(i) for i in ids], max_new_tokens)
        gen = self.engine(use_bita, prompt_tokens=longest)
        stream = None
        if on_text is not None:
            stream = _TextStream(self.tokenizer, on_text, single, len(texts))
        result = gen.generate(ids, max_new_tokens, sp, seed, on_tokens=stream)
        if stream is not None:
            stream(result.tokens, final=True)
        done = self._completions(result, ids, gen, temperature > 0)
        return done[0] if single else done

    def _completions(self, result: GenerationResult, ids: list[list[int]], gen: Engine,
                     sampled: bool) -> list[Completion]:
        is_bita = isinstance(gen, bita_step.BitaGenerator)
        mode = (self.method if is_bita else "plain") + ("-sampled" if sampled else "")
        eos = set(gen.eos_ids)
        out = []
        for prompt_ids, tokens, steps in zip(ids, result.tokens, result.row_steps):
            finish = "eos" if tokens and tokens[-1] in eos else "length"
            out.append(Completion(
                text=self.tokenizer.decode(tokens, skip_special_tokens=True),
                token_ids=list(tokens), prompt_tokens=len(prompt_ids), steps=steps,
                tokens_per_step=(len(tokens) - 1) / steps if steps else 1.0,
                seconds=result.seconds, compile_seconds=result.compile_seconds,
                finish_reason=finish, mode=mode, tree=gen.tree.name if is_bita else None,
                plain_steps=result.plain_steps))
        return out


class _TextStream:
    """Turns the engine's per-step token lists into text pieces for `on_text`."""

    def __init__(self, tokenizer, on_text, single: bool, rows: int):
        self.tokenizer, self.on_text, self.single = tokenizer, on_text, single
        self.printed = [""] * rows

    def __call__(self, tokens: list[list[int]], final: bool = False):
        for i, row in enumerate(tokens):
            text = self.tokenizer.decode(row, skip_special_tokens=True)
            # a partial UTF-8 character decodes to U+FFFD: wait for the rest of it
            if text.startswith(self.printed[i]) and (final or not text.endswith("\ufffd")):
                piece = text[len(self.printed[i]):]
                if piece:
                    self.printed[i] = text
                    if self.single:
                        self.on_text(piece)
                    else:
                        self.on_text(piece, i)


def load_base(model: str | os.PathLike = loading.DEFAULT_MODEL, dtype: str = "float32",
              mesh: Mesh | str | None = None) -> tuple[loading.LoadedModel, Mesh | None]:
    """The base model, loaded straight into its shards on `mesh` (a `Mesh`, its command-line
    form `data=D,model=N`, or None: one device); returns (model, the mesh or None).

    Raises:
      ValueError: a malformed mesh, or one that does not cover the devices.
      ModelLoadError, ConfigError: as `loading.load_model`.
    """
    if isinstance(mesh, str):
        mesh = sharding.parse_mesh(mesh)
    if mesh is None or mesh.size == 1:
        return loading.load_model(model, dtype=dtype), None
    # each device reads only its own shards
    shardings = sharding.param_shardings(loading.model_config(model, dtype), mesh)
    return loading.load_model(model, dtype=dtype, shardings=shardings), mesh


def load(model: str | os.PathLike = loading.DEFAULT_MODEL, adapter: str | os.PathLike | None =
         "default", tree: str = "auto", dtype: str = "float32", mesh: Mesh | str | None = None,
         max_cache: int | None = None, fallback: bool | None = None) -> LLM:
    """Loads a base model and its BiTA adapter, ready to generate.

    Args:
      model: a built-in name (`smollm2-135m`, embedded, offline), a HF model directory, or a
        .gguf file.
      adapter: `default` (the adapter shipped for a built-in model; plain decoding when none
        ships), an exported adapter directory (BiTA or SPACE: the method is read from it),
        `random:SEED[:M]` (untrained masks: lossless, few drafts accepted), or `none` / None
        (plain decoding only).
      tree: the draft tree: `auto` (BiTA: the tree of most predicted tokens per second on this
        machine, from the adapter's held-out acceptance statistics and this machine's measured
        step-cost curve, `eval.auto_tree`; an adapter without statistics, or a mesh: chain@1 on
        CPU, the paper's upper-triangle on GPU / TPU; SPACE: the same among chains of 1 to M
        masks, without statistics its chain of every mask),
        a template (`upper-triangle[:K]`, `chain`, `full[:K]`, with `-pruned` and `@D`), or a
        JSON file of paths.
      dtype: `float32` (equals HF transformers), `bfloat16` (bf16 weights, fp32 activations
        and cache: BiTA still equals greedy decoding) or `bfloat16-pure` (bf16 throughout).
      mesh: where to decode: None (one device), a `jax.sharding.Mesh` with axes ('data',
        'model'), or its command-line form `data=D,model=N` (`sharding.parse_mesh`). On a mesh
        the checkpoint loads straight into its shards (the logical-axis rules of
        `sharding.DEFAULT_RULES`), BiTA params are replicated, the KV cache is split by batch
        rows and kv heads, and a batch is padded to the 'data' size.
      max_cache: the longest prompt + max_new_tokens accepted (default and upper limit: the
        model's context length); the cache itself is sized per request.
      fallback: with `tree="auto"`, the decode loop switches to plain steps (lossless, on
        device) wherever the drafts accept fewer tokens per step than the chosen tree's step
        costs over a plain step's, and tries the tree again after a pause
        (`decoding.fallback`). True: for every prompt; False: never; None (the default): for
        prompts past chat length only, where the chat-calibrated acceptance statistics may not
        hold. On held-out chat it cost 4 % (ShareGPT) and gained 1 % on Code Alpaca; past chat
        length it kept a 2,000-token summary prompt at 1.02x plain greedy where the tree
        alone ran at 0.89x (docs/benchmarks.md). A fixed tree never switches.

    Raises:
      ModelLoadError, ConfigError: an unknown, unreadable or unsupported model.
      AdapterError: a missing, corrupt or mismatched adapter.
      TreeError: an unknown tree, or one deeper than the adapter's masks.
    """
    loaded, mesh = load_base(model, dtype, mesh)
    spec = "none" if adapter is None else str(adapter)
    if spec == "default":  # the shipped adapter; plain decoding when none ships for this model
        shipped = loading.shipped_adapter(loaded)
        spec = "none" if shipped is None else str(shipped)
    if spec == "none":
        return LLM(loaded, adapter="none", max_cache=max_cache, mesh=mesh, fallback=fallback)
    bita_params, bita_config, _ = loading.load_bita(spec, loaded)
    try:
        table = ngram.load(spec) if os.path.isdir(spec) else None
    except (OSError, ValueError, KeyError) as e:
        raise models.AdapterError(f"{spec}: unreadable {ngram.FILE} ({e}); delete it to decode "
                                   "without the n-gram table, or rebuild it") from None
    name = tree
    if tree == "auto":  # SPACE decodes with its chain; BiTA with the backend's tree
        name = "chain" if bita_config.method == "space" else auto_tree_name(jax.default_backend())
    llm = LLM(loaded, bita_params, bita_config, Tree.make(name, bita_config.num_masks),
              adapter=spec, max_cache=max_cache, mesh=mesh, fallback=fallback,
              ngram_table=table)
    if tree == "auto" and llm.mesh is None:
        _choose_tree(llm, spec)
    return llm


def _choose_tree(llm: LLM, adapter: str) -> None:
    """`tree="auto"` for an adapter that ships its acceptance statistics: the tree with the
    most predicted tokens per second on this machine (`eval.auto_tree`; SPACE: among chains of
    1 to M masks); without them, or on a mesh, the default tree stays."""
    from bita_jax.eval import auto_tree

    stats = auto_tree.load_acceptance(adapter if os.path.isdir(adapter) else None)
    m = llm.bita_config.num_masks
    if stats is None or stats.num_masks != m:
        return
    trees = auto_tree.candidates_for(llm.method, m, lookup=stats.texts is not None,
                                     dynamic=stats.top_logp is not None)
    curve = auto_tree.CostCurve(llm.cfg, llm.params, llm.loaded.fingerprint)
    llm.auto = (stats, trees, curve)
    llm.tree_choice = auto_tree.choose(trees, stats, curve.at(auto_tree.CONTEXT))
    llm._choices[auto_tree.CONTEXT] = llm.tree_choice
    llm.tree = llm.tree_choice.tree
