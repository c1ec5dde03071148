"""`Fallback`: the switch between tree steps and plain steps, by hand on a stand-in state, and
BiTA with it lossless against plain greedy (LLaMA and Falcon, random adapters, trees with and
without a lookup branch, batch 4 and 1, streamed), compiled once."""

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bita_jax import models
from bita_jax.decoding.ar import Generator
from bita_jax.decoding.bita_step import BitaGenerator
from bita_jax.decoding.engine import TRACES
from bita_jax.decoding.fallback import Fallback, FallbackState, init_state, run_adaptive
from bita_jax.decoding.sampling import SamplingParams
from bita_jax.decoding.tree import Tree
from tests.test_decode import FALCON, LLAMA, PROMPTS

# ---------------------------------------------------------------------------------------------
# The switch by hand.


@flax.struct.dataclass
class _State:
    """What `run_adaptive` reads of a `BitaState`, and a log of the kind of each step
    (1 tree, 2 plain)."""

    num_new: jnp.ndarray
    done: jnp.ndarray
    steps: jnp.ndarray
    fallback: FallbackState
    kinds: jnp.ndarray


def _kinds(policy: Fallback, tree_tokens, rows: int = 1, per_call: int | None = None,
           total: int = 24) -> str:
    """The steps run ('T' tree, 'P' plain) when tree step i emits tree_tokens[i] tokens per row
    and a plain step 1; `per_call` steps per `run_adaptive` call (None: one call)."""
    emits = jnp.asarray(tree_tokens, jnp.int32)

    def step(s, kind, count):
        return s.replace(num_new=s.num_new + count, steps=s.steps + 1,
                         kinds=s.kinds.at[s.steps].set(kind))

    def tree_step(s):
        return step(s, 1, emits[jnp.sum(s.kinds == 1)])

    def plain_step(s):
        return step(s, 2, 1)

    state = _State(num_new=jnp.zeros((rows,), jnp.int32), done=jnp.zeros((rows,), bool),
                   steps=jnp.int32(0), fallback=init_state(policy),
                   kinds=jnp.zeros((total,), jnp.int32))
    run = jax.jit(lambda s, n: run_adaptive(tree_step, plain_step, policy, s, n))
    while int(state.steps) < total:
        state = run(state, per_call or total)
    return "".join(" TP"[k] for k in np.asarray(state.kinds))


POLICY = Fallback(break_even=1.5, window=2, pause=2, max_pause=4)


def test_losing_windows_pause_and_the_pause_doubles_up_to_its_cap():
    # 2 tokens in a 2-step window < 1.5 x 2: pause 2; the first tree step after it is not
    # counted, the window after that loses again: pause 4, then 4 (the cap)
    assert _kinds(POLICY, [1] * 24) == "TTPPTTTPPPPTTTPPPPTTTPPP"


def test_winning_windows_never_pause():
    assert _kinds(POLICY, [2] * 24) == "T" * 24  # 4 tokens in 2 steps >= 1.5 x 2
    assert _kinds(POLICY, [1, 2] * 12) == "T" * 24  # 3 >= 3: a tie keeps the tree


def test_a_win_resets_the_pause_and_the_uncounted_step_is_not_counted():
    # window 1 loses (pause 2, next 4); after it, the uncounted step emits 1 and the next two
    # 2 each: that window wins, so the next loss pauses 2 again, not 4
    tokens = [1, 1, 1, 2, 2, 1, 1] + [5] * 20
    assert _kinds(POLICY, tokens) == "TTPPTTTTTPPTTTTTTTTTTTTT"


def test_streamed_steps_decide_as_one_loop():
    for tokens in ([1] * 24, [1, 1, 1, 2, 2, 1, 1] + [5] * 20):
        assert _kinds(POLICY, tokens, per_call=1) == _kinds(POLICY, tokens)
        assert _kinds(POLICY, tokens, per_call=5) == _kinds(POLICY, tokens)


def test_the_verdict_is_the_batch_mean_per_live_row():
    # 2 rows: each tree step emits 2 per row -> 8 tokens over 4 row-steps >= 1.5 x 4
    assert _kinds(POLICY, [2] * 24, rows=2) == "T" * 24
    assert _kinds(Fallback(2.5, window=2, pause=2, max_pause=4), [2] * 24, rows=2)[:4] == "TTPP"


def test_bad_policies_are_refused():
    for kwargs in (dict(break_even=0.0), dict(break_even=1.5, window=0),
                   dict(break_even=1.5, pause=8, max_pause=4)):
        with pytest.raises(ValueError, match="fallback"):
            Fallback(**kwargs)


# ---------------------------------------------------------------------------------------------
# Lossless BiTA with the switch.


@pytest.fixture(scope="module", params=[LLAMA, FALCON], ids=["llama", "falcon"])
def setup(request):
    cfg = request.param
    params = jax.tree.map(lambda x: 3 * x, models.init_params(cfg, jax.random.key(3)))
    bp = models.init_bita_params(cfg, models.BitaConfig(num_masks=3), jax.random.key(5))
    return cfg, params, bp


@pytest.mark.parametrize("model, tree_name", [("llama", "chain@1+lookup:4"),
                                              ("llama", "upper-triangle"), ("falcon", "chain")])
def test_fallback_is_lossless(model, tree_name):
    """Never, sometimes and nearly always plain steps: every output equals plain greedy, in one
    loop and streamed; the step counts add up."""
    cfg = {"llama": LLAMA, "falcon": FALCON}[model]
    params = jax.tree.map(lambda x: 3 * x, models.init_params(cfg, jax.random.key(3)))
    bp = models.init_bita_params(cfg, models.BitaConfig(num_masks=3), jax.random.key(5))
    tree = Tree.make(tree_name, 3)
    plain_steps = {}
    for prompts, n, break_evens in ((PROMPTS, 50, (0.5, 1.5, 100.0)), (PROMPTS[2:3], 37, (100.0,))):
        want = Generator(cfg, params).generate(prompts, n).tokens
        for break_even in break_evens:
            gen = BitaGenerator(cfg, params, bp, tree,
                                fallback=Fallback(break_even, window=2, pause=3, max_pause=8))
            start, decode = gen.prepare(prompts, n, SamplingParams.greedy())
            state = decode(start(), n)
            out, num = np.asarray(state.out), np.asarray(state.num_new)
            assert [r[:k].tolist() for r, k in zip(out, num)] == want, (tree_name, break_even)
            plain_steps[break_even, len(prompts)] = (int(state.fallback.plain_steps),
                                                     int(state.steps))
            hist, row_steps = np.asarray(state.step_hist), np.asarray(state.row_steps)
            np.testing.assert_array_equal(hist.sum(axis=1), row_steps)
            if break_even == 1.5:
                streamed = []
                got = gen.generate(prompts, n, on_tokens=streamed.append)
                assert got.tokens == want and streamed[-1] == want
    assert plain_steps[0.5, 4][0] == 0
    for rows in (4, 1):
        # windows of 2 tree steps (and 1 uncounted) between pauses of 3, 6, 8, 8, ... plain
        plain, steps = plain_steps[100.0, rows]
        assert plain > steps / 2, (plain, steps)


def test_fallback_loop_compiles_once(setup):
    cfg, params, bp = setup
    cfg = cfg.replace(rope_theta=6543.0)
    tree = Tree.make("chain@1+lookup:4", 3)
    gen = BitaGenerator(cfg, params, bp, tree, fallback=Fallback(1.5, window=2, pause=2))
    for prompts, n in (([[1, 2, 3], [4, 5]], 10), ([[9, 8, 7, 6, 5, 4], [1]], 40),
                       ([[3] * 12, [2] * 5], 17)):
        assert gen.generate(prompts, n).tokens == Generator(cfg, params).generate(prompts,
                                                                                  n).tokens
    assert TRACES[("bita", cfg, tree)] == 1
