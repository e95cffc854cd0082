"""hsd_jax.losses against naive float64 NumPy references that materialise full logits.

Gradients are checked against central finite differences of the NumPy references (float64).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from hsd_jax import losses as L

B, T, D, V = 3, 5, 6, 11  # B*T = 15 positions: chunk sizes 4 and 7 do not divide it
TEMP = 0.7
fast = settings(max_examples=20, deadline=None)
f32 = jnp.float32


# ------------------------------------------------------------------ NumPy references (float64)


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_take(x, idx):
    return np.take_along_axis(x, idx[..., None], -1)[..., 0]


def np_kl(lp, lq):
    return (np.exp(lp) * (lp - lq)).sum(-1)


def np_divergence(lt, ls, kind, alpha):
    if kind == "kl" or (kind == "jsd" and alpha == 0):
        return np_kl(lt, ls)
    if kind == "reverse_kl" or (kind == "jsd" and alpha == 1):
        return np_kl(ls, lt)
    lm = np.log((1 - alpha) * np.exp(ls) + alpha * np.exp(lt))
    return (1 - alpha) * np_kl(ls, lm) + alpha * np_kl(lt, lm)


def np_tail(lp):
    return np.concatenate([lp, np.log(1 - np.exp(lp).sum(-1, keepdims=True))], -1)


def np_distill(th, sh, head_t, head_s, tg, divergence="kl", alpha=0.5, top_k=None,
               top_k_support="student"):
    """Full-logit reference; the teacher uses its own (fixed) copy of the head."""
    zt, zs = th @ head_t / TEMP, sh @ head_s / TEMP
    lt, ls = np_log_softmax(zt), np_log_softmax(zs)
    tok_t, tok_s = np_take(lt, tg), np_take(ls, tg)
    if divergence == "sampled":
        div = tok_s - tok_t
    elif top_k:
        idx = np.argsort(-(zs if top_k_support == "student" else zt), -1)[..., :top_k]
        pick = lambda lp: np_tail(np.take_along_axis(lp, idx, -1))
        div = np_divergence(pick(lt), pick(ls), divergence, alpha)
    else:
        div = np_divergence(lt, ls, divergence, alpha)
    return {"divergence": div, "credit": tok_t - tok_s, "logprobs": tok_s,
            "entropy": -(np.exp(ls) * ls).sum(-1)}


def fd_grad(f, x, eps=1e-6):
    g = np.zeros_like(x)
    for i in range(x.size):
        xp, xm = x.copy(), x.copy()
        xp.flat[i] += eps
        xm.flat[i] -= eps
        g.flat[i] = (f(xp) - f(xm)) / (2 * eps)
    return g


def np_policy(logp, old, adv, mask, eps_low, eps_high, dual_clip=None, level="token"):
    lr = logp - old
    if level == "sequence":
        seq = (lr * mask).sum(-1) / np.maximum(mask.sum(-1), 1)
        lr = np.repeat(seq[:, None], lr.shape[1], 1)
    r = np.exp(lr)
    a = adv[:, None] if adv.ndim == 1 else adv
    loss = np.maximum(-a * r, -a * np.clip(r, 1 - eps_low, 1 + eps_high))
    if dual_clip:
        loss = np.where(a < 0, np.minimum(loss, -a * dual_clip), loss)
    return loss


def np_aggregate(v, m, mode, norm=None):
    rows = [i for i in range(v.shape[0]) if m[i].sum() > 0]
    if mode == "token-mean":
        return (v * m).sum() / max(m.sum(), 1)
    if not rows:
        return 0.0
    if mode == "seq-mean-token-mean":
        return np.mean([(v[i] * m[i]).sum() / m[i].sum() for i in rows])
    if mode == "seq-mean-token-sum":
        return np.mean([(v[i] * m[i]).sum() for i in rows])
    return np.mean([(v[i] * m[i]).sum() / (norm or v.shape[1]) for i in rows])


def np_ref_kl(logp, ref, kind):
    d = ref - logp
    return {"k1": -d, "k2": 0.5 * d**2, "k3": np.exp(d) - d - 1}[kind]


def np_objective(cfg, logp, div, b):
    """Composed objective in float64 from the batch dict ``b`` (see ``make_batch``)."""
    m, norm = b["mask"], cfg.max_response_length
    loss = 0.0
    if cfg.w_pg:
        adv = b["adv"]
        if cfg.rlsd_lambda:
            w = np.clip(np.exp(np.sign(adv)[:, None] * b["credit"]), 0.8, 1.2)
            adv = adv[:, None] * ((1 - cfg.rlsd_lambda) + cfg.rlsd_lambda * w)
        pg = np_policy(logp, b["old"], adv, m, cfg.eps_low, cfg.eps_high, cfg.dual_clip,
                       cfg.ratio_level)
        loss += cfg.w_pg * np_aggregate(pg, m, cfg.agg, norm)
    if cfg.w_sd:
        loss += cfg.w_sd * np_aggregate(div, m * b["distill_mask"][:, None], cfg.agg, norm)
    if cfg.beta:
        kl = np_ref_kl(logp, b["ref"], cfg.ref_kl)
        if cfg.ref_kl_level == "sequence":  # sum over each sequence's tokens, mean over sequences
            rows = m.sum(1) > 0
            loss += cfg.beta * (kl * m).sum(1)[rows].mean()
        else:
            loss += cfg.beta * np_aggregate(kl, m, cfg.agg, norm)
    return loss


# ------------------------------------------------------------------ fixtures


def draw(seed, teacher_equals_student=False):
    r = np.random.default_rng(seed)
    th = r.normal(size=(B, T, D))
    sh = th.copy() if teacher_equals_student else r.normal(size=(B, T, D))
    head = r.normal(size=(D, V)) * 1.5 / np.sqrt(D)
    return th, sh, head, r.integers(0, V, (B, T))


def as_jax(*arrays):
    return tuple(jnp.asarray(x, jnp.int32 if x.dtype.kind == "i" else f32) for x in arrays)


@functools.lru_cache(maxsize=None)
def jit_distill(chunk_size=4, **case):
    """Jitted ``(th, sh, head, tg, w1, w2) -> (sum(w1 div + w2 logp), DistillOutput), grads``."""

    def loss(sh, head, th, tg, w1, w2):
        out = L.distill_divergence(th, sh, head, tg, temperature=TEMP, chunk_size=chunk_size,
                                   **case)
        return jnp.sum(out.divergence * w1 + out.logprobs * w2), out

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
    return jax.jit(lambda th, sh, head, tg, w1, w2: grad(sh, head, th, tg, w1, w2))


DIV_CASES = [
    dict(divergence="kl"),
    dict(divergence="reverse_kl"),
    dict(divergence="jsd", alpha=0.3),
    dict(divergence="jsd", alpha=0.0),
    dict(divergence="jsd", alpha=1.0),
    dict(divergence="kl", top_k=4),
    dict(divergence="jsd", alpha=0.5, top_k=3, top_k_support="teacher"),
    dict(divergence="sampled"),
]


# ------------------------------------------------------------------ chunked logprobs


@pytest.mark.parametrize("chunk_size,layout", [(4, "dv"), (15, "vd"), (64, "dv")])
def test_token_logprobs_values_and_grads(chunk_size, layout):
    _, h, head, tg = draw(0)
    w = np.random.default_rng(1).normal(size=(B, T))
    ref = lambda h, head: np_log_softmax(h @ head / TEMP)
    lp = ref(h, head)
    head_arg = head if layout == "dv" else head.T

    def f(h, head):
        logp, ent = L.token_logprobs(h, head, jnp.int32(tg), temperature=TEMP,
                                     chunk_size=chunk_size, head_layout=layout)
        return jnp.sum(logp * w), (logp, ent)

    (_, (got_lp, got_ent)), (gh, gw) = jax.jit(
        jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(f32(h), f32(head_arg))
    np.testing.assert_allclose(got_lp, np_take(lp, tg), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_ent, -(np.exp(lp) * lp).sum(-1), rtol=1e-5, atol=1e-5)
    scalar = lambda h, head: (np_take(ref(h, head), tg) * w).sum()
    np.testing.assert_allclose(gh, fd_grad(lambda x: scalar(x, head), h), rtol=1e-3, atol=1e-4)
    fd_head = fd_grad(lambda x: scalar(h, x), head)
    np.testing.assert_allclose(gw, fd_head if layout == "dv" else fd_head.T, rtol=1e-3, atol=1e-4)


# ------------------------------------------------------------------ fused divergence


@pytest.mark.parametrize("case", DIV_CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_distill_values_and_grads(case):
    th, sh, head, tg = draw(2)
    w1, w2 = np.random.default_rng(3).normal(size=(2, B, T))
    want = np_distill(th, sh, head, head, tg, **case)
    (_, got), (gs, gw, _) = jit_distill(**case)(*as_jax(th, sh, head, tg, w1, w2))
    for name, value in want.items():
        np.testing.assert_allclose(getattr(got, name), value, rtol=1e-4, atol=1e-5, err_msg=name)
    delta0 = want["divergence"]  # sampled: the gradient is sg(delta) * grad log pS

    def scalar(sh_, head_s):  # the teacher keeps the unperturbed head: it is a constant
        o = np_distill(th, sh_, head, head_s, tg, **case)
        div = delta0 * o["logprobs"] if case["divergence"] == "sampled" else o["divergence"]
        return (div * w1 + o["logprobs"] * w2).sum()

    np.testing.assert_allclose(gs, fd_grad(lambda x: scalar(x, head), sh), rtol=2e-3, atol=2e-4)
    np.testing.assert_allclose(gw, fd_grad(lambda x: scalar(sh, x), head), rtol=2e-3, atol=2e-4)


def test_distill_independent_of_chunk_size():
    case = DIV_CASES[5]  # top-k: the most involved path; all kinds share the chunking
    args = as_jax(*draw(4), *np.random.default_rng(5).normal(size=(2, B, T)))
    base = jax.tree.leaves(jit_distill(chunk_size=B * T, **case)(*args))
    for c in (1, 4, 7):
        for got, want in zip(jax.tree.leaves(jit_distill(chunk_size=c, **case)(*args)), base):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-4)


PROPERTY_CASES = [*DIV_CASES[:3], DIV_CASES[5], dict(divergence="jsd", alpha=0.5)]


def divergence_of(case, th, sh, head, tg):
    zeros = jnp.zeros((B, T))
    return jit_distill(**case)(th, sh, head, tg, zeros, zeros)[0][1].divergence


@fast
@given(seed=st.integers(0, 2**31), equal=st.booleans())
def test_divergences_nonnegative_and_zero_iff_equal(seed, equal):
    args = as_jax(*draw(seed, teacher_equals_student=equal))
    for v in [np.asarray(divergence_of(case, *args)) for case in PROPERTY_CASES]:
        assert np.all(v >= -1e-6)
        if equal:
            np.testing.assert_allclose(v, 0.0, atol=1e-5)
        else:
            assert v.max() > 1e-4


@fast
@given(seed=st.integers(0, 2**31))
def test_jsd_symmetric_at_half(seed):
    th, sh, head, tg = as_jax(*draw(seed))
    jsd = PROPERTY_CASES[-1]
    np.testing.assert_allclose(divergence_of(jsd, th, sh, head, tg),
                               divergence_of(jsd, sh, th, head, tg), rtol=1e-5, atol=1e-6)


@fast
@given(seed=st.integers(0, 2**31))
def test_no_gradient_through_teacher(seed):
    args = as_jax(*draw(seed), *np.random.default_rng(seed).normal(size=(2, B, T)))
    grad_teacher = jit_distill(**DIV_CASES[2])(*args)[1][2]
    assert np.all(np.asarray(grad_teacher) == 0.0)


# ------------------------------------------------------------------ advantages and shaping


def test_group_advantages_values():
    r = np.random.default_rng(5).integers(0, 2, (4, 6)).astype(np.float64)
    r[0] = 1.0  # a degenerate group
    mean, std = r.mean(1, keepdims=True), r.std(1, ddof=1, keepdims=True)
    np.testing.assert_allclose(L.group_advantages(f32(r)), (r - mean) / (std + 1e-6), rtol=1e-5)
    flat = L.group_advantages(f32(r.reshape(-1)), group_size=6, normalize_std=False)
    np.testing.assert_allclose(flat, (r - mean).reshape(-1), atol=1e-6)
    keep = L.nondegenerate_mask(f32(r.reshape(-1)), group_size=6)
    np.testing.assert_array_equal(keep, np.repeat(r.min(1) != r.max(1), 6))


@fast
@given(g=st.sampled_from([2, 5, 8]), seed=st.integers(0, 2**31), std=st.booleans())
def test_advantages_sum_to_zero_per_group(g, seed, std):
    r = np.random.default_rng(seed).normal(size=(3, g)) * 10
    adv = np.asarray(L.group_advantages(f32(r), normalize_std=std))
    np.testing.assert_allclose(adv.sum(1), 0.0, atol=1e-4)


def test_overlong_penalty_and_rollout_advantages():
    lengths = jnp.array([100, 3072, 3584, 4096, 5000])
    np.testing.assert_allclose(L.overlong_penalty(lengths, max_length=4096, buffer=1024),
                               [0.0, 0.0, -0.5, -1.0, -1.0])
    rewards = jnp.array([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    lens = jnp.array([[10, 3584, 4096, 10], [10, 10, 10, 3584]])
    adv, keep = L.rollout_advantages(rewards, lens, L.preset("dapo"))
    shaped = np.array([[1.0, -0.5, 0.0, 0.0], [1.0, 1.0, 1.0, 0.5]])
    mean, std = shaped.mean(1, keepdims=True), shaped.std(1, ddof=1, keepdims=True)
    np.testing.assert_allclose(adv, (shaped - mean) / (std + 1e-6), rtol=1e-5)
    np.testing.assert_array_equal(keep, [[True] * 4, [False] * 4])


def test_rollout_advantages_default_keeps_all():
    adv, keep = L.rollout_advantages(f32([1, 1, 0, 1]), jnp.int32([5] * 4), L.preset("dr_grpo"),
                                     group_size=2)
    np.testing.assert_allclose(adv, [0.0, 0.0, -0.5, 0.5])
    assert bool(keep.all())


def test_rlsd_token_advantages():
    r = np.random.default_rng(6)
    adv, credit = r.normal(size=B), r.normal(size=(B, T)) * 0.3
    w = np.clip(np.exp(np.sign(adv)[:, None] * credit), 0.8, 1.2)
    np.testing.assert_allclose(L.rlsd_token_advantages(f32(adv), f32(credit), lam=0.7),
                               adv[:, None] * (0.3 + 0.7 * w), rtol=1e-5)


# ------------------------------------------------------------------ policy loss, ref KL, aggregation


def make_batch(seed):
    """4 rows of ragged responses (one empty); row 1 has no teacher signal."""
    r = np.random.default_rng(seed)
    mask = (np.arange(T)[None] < np.array([T, 2, 0, 4])[:, None]).astype(np.float64)
    noise = lambda scale: r.normal(size=mask.shape) * scale
    logp = -np.abs(noise(1.0))
    return {"logp": logp, "old": logp + noise(0.3), "ref": logp + noise(0.3), "mask": mask,
            "adv": r.normal(size=mask.shape[0]), "div": np.abs(noise(1.0)),
            "distill_mask": np.array([1.0, 0.0, 1.0, 1.0]), "credit": noise(0.3)}


@pytest.mark.parametrize("level,dual", [("token", None), ("token", 3.0), ("sequence", None)])
def test_policy_loss_values_and_grads(level, dual):
    b = make_batch(7)
    scale = 0.3 if level == "token" else 0.05
    b["old"] = b["logp"] + np.random.default_rng(8).normal(size=b["mask"].shape) * scale
    kw = dict(eps_low=0.1, eps_high=0.15, dual_clip=dual)
    f = lambda lp: L.policy_loss(lp, f32(b["old"]), f32(b["adv"]), f32(b["mask"]), **kw,
                                 ratio_level=level)[0]
    want = np_policy(b["logp"], b["old"], b["adv"], b["mask"], *kw.values(), level)
    np.testing.assert_allclose(f(f32(b["logp"])) * b["mask"], want * b["mask"], rtol=1e-5,
                               atol=1e-6)
    mean = lambda num_den: num_den[0] / num_den[1]
    g = jax.grad(lambda lp: mean(L.aggregate(f(lp), f32(b["mask"]), "seq-mean-token-mean")))(
        f32(b["logp"]))
    np_loss = lambda lp: np_aggregate(np_policy(lp, b["old"], b["adv"], b["mask"], *kw.values(),
                                                level), b["mask"], "seq-mean-token-mean")
    np.testing.assert_allclose(g, fd_grad(np_loss, b["logp"]), rtol=1e-3, atol=1e-5)


@functools.partial(jax.jit, static_argnums=2)
def _policy_grad(lp, adv, dual):
    loss = lambda lp: L.policy_loss(lp, jnp.zeros_like(lp), adv, jnp.ones_like(lp), eps_low=0.2,
                                    eps_high=0.28, dual_clip=dual)[0].sum()
    return jax.grad(loss)(lp)


@fast
@given(a=st.floats(0.1, 3.0), neg=st.booleans(), r=st.floats(0.05, 8.0),
       dual=st.sampled_from([None, 3.0]))
def test_policy_gradient_zero_outside_trust_region(a, neg, r, dual):
    assume(min(abs(r - 0.8), abs(r - 1.28), abs(r - 3.0)) > 1e-3)  # kinks: one-sided gradients
    adv = -a if neg else a
    grad = _policy_grad(jnp.full((1, 1), np.log(r), f32), f32([adv]), dual)[0, 0]
    outside = (adv > 0 and r > 1.28) or (adv < 0 and r < 0.8) or (dual and adv < 0 and r > dual)
    if outside:
        assert grad == 0.0
    else:
        np.testing.assert_allclose(grad, -adv * r, rtol=1e-4)


@pytest.mark.parametrize("kind", L.REF_KLS)
def test_ref_kl_values_and_grads(kind):
    b = make_batch(9)
    got = L.ref_kl(f32(b["logp"]), f32(b["ref"]), kind)
    np.testing.assert_allclose(got, np_ref_kl(b["logp"], b["ref"], kind), rtol=1e-5, atol=1e-6)
    g = jax.grad(lambda lp: L.ref_kl(lp, f32(b["ref"]), kind).sum())(f32(b["logp"]))
    fd = fd_grad(lambda lp: np_ref_kl(lp, b["ref"], kind).sum(), b["logp"])
    np.testing.assert_allclose(g, fd, rtol=1e-4, atol=1e-5)


def test_k3_clamped():
    value, grad = jax.value_and_grad(lambda lp: L.ref_kl(lp, f32(0.0)))(f32(-30.0))
    assert float(value) == 10.0 and float(grad) == 0.0


@pytest.mark.parametrize("mode", L.AGGREGATIONS)
def test_aggregate_values(mode):
    b = make_batch(10)
    num, den = L.aggregate(f32(b["div"]), f32(b["mask"]), mode, norm_length=8)
    np.testing.assert_allclose(num / den, np_aggregate(b["div"], b["mask"], mode, 8), rtol=1e-5)


@fast
@given(seed=st.integers(0, 2**31), split=st.integers(1, 5), mode=st.sampled_from(L.AGGREGATIONS))
def test_aggregate_accumulates_like_one_batch(seed, split, mode):
    r = np.random.default_rng(seed)
    v, m = r.normal(size=(6, T)), (r.random((6, T)) < 0.6).astype(np.float64)
    parts = [L.aggregate(f32(v[s]), f32(m[s]), mode) for s in (slice(0, split), slice(split, 6))]
    num, den = L.aggregate(f32(v), f32(m), mode)
    np.testing.assert_allclose(sum(p[0] for p in parts), num, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sum(p[1] for p in parts), den)
    np.testing.assert_allclose(num / jnp.maximum(den, 1), np_aggregate(v, m, mode), rtol=1e-5,
                               atol=1e-6)


# ------------------------------------------------------------------ composed objective


def loss_inputs(b, logp, div):
    return L.LossInputs(
        logprobs=logp, mask=f32(b["mask"]), old_logprobs=f32(b["old"]), ref_logprobs=f32(b["ref"]),
        advantages=f32(b["adv"]), divergence=div, distill_mask=f32(b["distill_mask"]),
        credit=f32(b["credit"]))


@pytest.mark.parametrize("name,level", [(name, "token") for name in L.PRESETS]
                         + [("hsd", "sequence"), ("dapo", "sequence"), ("hsd_grpo", "sequence")])
def test_objective_matches_numpy(name, level):
    cfg = L.preset(name, max_response_length=8, overlong_buffer=0, ref_kl_level=level, beta=0.1)
    b = make_batch(11)
    if name == "gspo":  # keep the sequence ratio near its narrow trust region
        b["old"] = b["logp"] + np.random.default_rng(12).normal(size=b["mask"].shape) * 1e-3
    f = lambda lp, d: L.objective(loss_inputs(b, lp, d), cfg)
    (loss, metrics), (g_lp, g_div) = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(
        f32(b["logp"]), f32(b["div"]))
    np.testing.assert_allclose(loss, np_objective(cfg, b["logp"], b["div"], b), rtol=1e-5,
                               atol=1e-7)
    np.testing.assert_allclose(metrics["loss"], loss)
    fd_lp = fd_grad(lambda x: np_objective(cfg, x, b["div"], b), b["logp"])
    fd_div = fd_grad(lambda x: np_objective(cfg, b["logp"], x, b), b["div"])
    np.testing.assert_allclose(g_lp, fd_lp, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(g_div, fd_div, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("name,level", [("dr_grpo", "token"), ("dapo", "token"), ("gspo", "token"),
                                        ("grpo_opsd", "token"), ("dapo", "sequence")])  # all modes and terms
def test_objective_accumulates_like_one_batch(name, level):
    cfg = L.preset(name, max_response_length=8, overlong_buffer=0, ref_kl_level=level)
    b = make_batch(13)
    full = loss_inputs(b, f32(b["logp"]), f32(b["div"]))
    dens = L.loss_denominators(full.mask, full.distill_mask, cfg)
    value_and_grad = jax.jit(jax.value_and_grad(
        lambda inp, d: L.objective(inp, cfg, denominators=d)[0]))
    total, grads = 0.0, []
    for rows in (slice(0, 2), slice(2, 4)):
        value, grad = value_and_grad(jax.tree.map(lambda x: x[rows], full), dens)
        total += value
        grads.append(grad)
    loss_full, g_full = value_and_grad(full, dens)
    np.testing.assert_allclose(total, loss_full, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(loss_full, L.objective(full, cfg)[0], rtol=1e-6)
    for field in ("logprobs", "divergence"):
        parts = np.concatenate([getattr(g, field) for g in grads])
        np.testing.assert_allclose(parts, getattr(g_full, field), rtol=1e-6, atol=1e-8)


def test_objective_metrics():
    b = make_batch(14)
    inputs = loss_inputs(b, f32(b["logp"]), f32(b["div"]))._replace(
        entropy=jnp.ones(b["mask"].shape))
    _, m = L.objective(inputs, L.preset("grpo_opsd"))
    ratio, a = np.exp(b["logp"] - b["old"]), b["adv"][:, None]
    clipped = -a * np.clip(ratio, 0.8, 1.2) > -a * ratio
    token_mean = lambda v, mask=b["mask"]: (v * mask).sum() / mask.sum()
    np.testing.assert_allclose(m["clip_frac"], token_mean(clipped), rtol=1e-6)
    k3 = np_ref_kl(b["logp"], b["ref"], "k3")
    np.testing.assert_allclose(m["kl"], token_mean(k3), rtol=1e-5)
    np.testing.assert_allclose(m["credit"], token_mean(b["credit"]), rtol=1e-5)
    np.testing.assert_allclose(m["entropy"], 1.0)
    sd_mask = b["mask"] * b["distill_mask"][:, None]
    np.testing.assert_allclose(m["divergence"], token_mean(b["div"], sd_mask), rtol=1e-5)


def _bare_inputs():
    return L.LossInputs(jnp.zeros((B, T)), jnp.ones((B, T)))


@pytest.mark.parametrize("make,field", [
    (lambda: L.preset("ppo"), "ppo"),
    (lambda: L.LossConfig(agg="mean"), "agg"),
    (lambda: L.LossConfig(w_pg=0.0, w_sd=0.0), "w_pg"),
    (lambda: L.LossConfig(rlsd_lambda=0.5), "rlsd_lambda"),
    (lambda: L.LossConfig(divergence="sampled", top_k=5), "top_k"),
    (lambda: L.LossConfig(alpha=1.5), "alpha"),
    (lambda: L.LossConfig(dual_clip=0.5), "dual_clip"),
    (lambda: L.preset("dapo", max_response_length=512), "overlong_buffer"),
    (lambda: L.objective(_bare_inputs(), L.preset("grpo")), "advantages"),
    (lambda: L.objective(_bare_inputs(), L.preset("hsd")), "divergence"),
    (lambda: L.LossConfig(w_pg=1.0, ratio_level="sequence"), "fused_grad"),
    (lambda: L.chunked_objective(jnp.zeros((B, T, D)), jnp.zeros((D, V)), jnp.zeros((B, T), int), _bare_inputs(),
                                 L.preset("hsd")), "teacher_hidden"),
    (lambda: L.group_advantages(jnp.zeros(7), group_size=2), "group_size"),
])
def test_errors_name_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_hsd_grpo_is_half_hsd_plus_half_grpo():
    b = make_batch(15)
    inputs = loss_inputs(b, f32(b["logp"]), f32(b["div"]))
    loss = lambda name, **kw: float(L.objective(inputs, L.preset(name, max_response_length=8, **kw))[0])
    hsd, grpo = loss("hsd", beta=0.0), loss("grpo", beta=0.0)
    assert L.preset("hsd_grpo").needs_teacher and L.preset("hsd_grpo").divergence == "kl"
    np.testing.assert_allclose(loss("hsd_grpo", beta=0.0), 0.5 * hsd + 0.5 * grpo, rtol=1e-6)


def test_sequence_level_ref_kl_scales_with_length_token_level_does_not():
    logp = np.zeros((2, T))
    ref = np.full((2, T), -0.5)
    mask = np.zeros((2, T))
    mask[0, :2], mask[1, :] = 1, 1  # a 2-token and a T-token sequence with the same per-token KL
    inputs = L.LossInputs(logprobs=f32(logp), mask=f32(mask), ref_logprobs=f32(ref), divergence=f32(logp))
    per_token = np.exp(-0.5) + 0.5 - 1
    value = lambda level: float(L.objective(inputs, L.preset("hsd", beta=1.0, ref_kl_level=level))[1]["ref_kl"])
    np.testing.assert_allclose(value("token"), per_token, rtol=1e-5)
    np.testing.assert_allclose(value("sequence"), per_token * (2 + T) / 2, rtol=1e-5)


def test_distill_with_the_teachers_own_head():
    """An EMA teacher has its own LM head: the teacher's logits use it, the gradient reaches only `head`."""
    th, sh, head, tg = draw(6)
    teacher_head = head + np.random.default_rng(7).normal(size=head.shape) * 0.3
    want = np_distill(th, sh, teacher_head, head, tg)
    f = lambda w, tw: L.distill_divergence(f32(th), f32(sh), w, jnp.asarray(tg), temperature=TEMP, chunk_size=3,
                                           teacher_head=tw)
    got = f(f32(head), f32(teacher_head))
    np.testing.assert_allclose(got.divergence, want["divergence"], rtol=1e-4, atol=1e-5)
    shared = f(f32(head), None)
    assert float(jnp.max(jnp.abs(shared.divergence - got.divergence))) > 1e-3
    g_teacher = jax.grad(lambda tw: f(f32(head), tw).divergence.sum())(f32(teacher_head))
    assert float(jnp.max(jnp.abs(g_teacher))) == 0.0


# ------------------------------------------------------------------ the objective over the LM head


# (preset, overrides, chunk size, head layout, old log-probs given, teacher's own head). Chunk
# sizes 4 and 7 leave a padded last chunk of the 20 positions; row 2 is empty, row 1 has no
# teacher signal (distill_mask), so masking and padding are exercised in every case.
CHUNKED_CASES = [
    ("hsd", {}, 4, "dv", False, False),
    ("opsd", {}, 7, "vd", True, False),
    ("sdpo", dict(top_k=4), 4, "dv", True, True),
    ("grpo", {}, 7, "dv", False, False),
    ("dr_grpo", {}, 20, "vd", True, False),
    ("dapo", dict(ref_kl_level="sequence"), 64, "dv", True, False),
    ("gspo", {}, 4, "dv", True, False),  # fused_grad=False: the sequence ratio stays on autodiff
    ("rlsd", {}, 7, "vd", True, False),
    ("grpo_opsd", dict(dual_clip=3.0), 4, "dv", True, False),
    ("hsd_grpo", dict(ref_kl="k2"), 7, "dv", False, True),
    ("hsd", dict(divergence="sampled", agg="token-mean"), 4, "vd", False, False),
    ("hsd", dict(divergence="reverse_kl"), 7, "dv", True, False),
    ("opsd", dict(alpha=0.3, top_k=3), 4, "vd", False, False),
]


def chunked_batch(seed):
    """4 rows x T of hidden states and per-row inputs: ragged mask with an empty row, one row
    without a teacher signal, old log-probs near the current ones."""
    r = np.random.default_rng(seed)
    th, sh = r.normal(size=(2, 4, T, D))
    head = r.normal(size=(D, V)) * 1.5 / np.sqrt(D)
    b = {"th": th, "sh": sh, "head": head, "teacher_head": head + r.normal(size=head.shape) * 0.3,
         "tg": r.integers(0, V, (4, T)), "mask": (np.arange(T)[None] < np.array([T, 2, 0, 4])[:, None]) * 1.0,
         "adv": r.normal(size=4), "distill_mask": np.array([1.0, 0.0, 1.0, 1.0])}
    logp = np_distill(th, sh, b["teacher_head"], head, b["tg"])["logprobs"]
    b["old"], b["ref"] = logp + r.normal(size=(2, 4, T)) * 0.2
    return b


def np_chunked_objective(cfg, b, sh, head, frozen, teacher_head):
    """The objective in float64 from full logits; ``frozen`` holds the stop-gradient quantities
    at the unperturbed point (credit, the sampled estimator's delta and log pS, on-policy old
    log-probs)."""
    d = np_distill(b["th"], sh, teacher_head, head, b["tg"], divergence=cfg.divergence, alpha=cfg.alpha,
                   top_k=cfg.top_k)
    div = d["divergence"]
    if cfg.divergence == "sampled":  # value delta, gradient sg(delta) * grad log pS
        div = frozen["delta"] * (1.0 + d["logprobs"] - frozen["logprobs"])
    batch = {**b, "credit": frozen["credit"], "old": frozen["old"]}
    return np_objective(cfg, d["logprobs"], div, batch)


@functools.lru_cache(maxsize=None)
def jit_chunked(cfg, layout, old_given, own_teacher_head):
    def loss(sh, head, b):
        inputs = L.LossInputs(None, b["mask"], old_logprobs=b["old"] if old_given else None, ref_logprobs=b["ref"],
                              advantages=b["adv"], distill_mask=b["distill_mask"])
        teacher_head = b["teacher_head"] if own_teacher_head else None
        if layout == "vd" and teacher_head is not None:
            teacher_head = teacher_head.T
        loss, metrics, out = L.chunked_objective(sh, head, b["tg"], inputs, cfg, teacher_hidden=b["th"],
                                                 teacher_head=teacher_head, head_layout=layout)
        return loss, (metrics, out)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


@pytest.mark.parametrize("name,overrides,chunk_size,layout,old_given,own_teacher_head", CHUNKED_CASES,
                         ids=[f"{c[0]}-{'-'.join(map(str, c[1].values()))}-{c[2]}-{c[3]}" for c in CHUNKED_CASES])
def test_chunked_objective_fused_equals_autodiff_and_numpy(name, overrides, chunk_size, layout, old_given,
                                                          own_teacher_head):
    """Both gradient paths against each other (float32, tight) and against float64 NumPy with
    finite-difference gradients w.r.t. the student hidden states and the head."""
    base = L.preset(name, max_response_length=8, overlong_buffer=0, beta=0.1, temperature=TEMP,
                    chunk_size=chunk_size, **overrides)
    b = chunked_batch(21)
    args = jax.tree.map(lambda x: jnp.asarray(x, jnp.int32 if x.dtype.kind == "i" else f32), b)
    head_arg = args["head"] if layout == "dv" else args["head"].T
    paths = [False, True] if base.fused_grad else [False]
    got = {fused: jit_chunked(dataclasses.replace(base, fused_grad=fused), layout, old_given, own_teacher_head)(
        args["sh"], head_arg, args) for fused in paths}
    (loss, (metrics, out)), (g_sh, g_head) = got[paths[-1]]
    if base.fused_grad:  # exact against today's autodiff path
        (loss0, (metrics0, out0)), grads0 = got[False]
        np.testing.assert_allclose(loss, loss0, rtol=1e-6, atol=1e-8)
        assert metrics.keys() == metrics0.keys()
        for k in metrics:
            np.testing.assert_allclose(metrics[k], metrics0[k], rtol=1e-6, atol=1e-8, err_msg=k)
        for k, v in out._asdict().items():
            assert (v is None) == (getattr(out0, k) is None), k
            if v is not None:
                np.testing.assert_allclose(v, getattr(out0, k), rtol=1e-6, atol=1e-7, err_msg=k)
        for g, g0 in zip((g_sh, g_head), grads0):
            np.testing.assert_allclose(g, g0, rtol=1e-5, atol=1e-7)

    teacher_head = b["teacher_head"] if own_teacher_head else b["head"]
    d0 = np_distill(b["th"], b["sh"], teacher_head, b["head"], b["tg"], divergence=base.divergence,
                    alpha=base.alpha, top_k=base.top_k)
    frozen = {"credit": d0["credit"], "delta": d0["divergence"], "logprobs": d0["logprobs"],
              "old": b["old"] if old_given else d0["logprobs"]}
    want = lambda sh, head: np_chunked_objective(base, b, sh, head, frozen, teacher_head)
    np.testing.assert_allclose(loss, want(b["sh"], b["head"]), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out.logprobs, d0["logprobs"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_sh, fd_grad(lambda x: want(x, b["head"]), b["sh"]), rtol=2e-3, atol=2e-5)
    fd_head = fd_grad(lambda x: want(b["sh"], x), b["head"])
    np.testing.assert_allclose(g_head, fd_head if layout == "dv" else fd_head.T, rtol=2e-3, atol=2e-5)


def test_fused_micro_batches_sum_to_the_full_batch():
    """With whole-batch denominators, the fused gradients of two row halves add up to the full batch's."""
    cfg = L.preset("hsd_grpo", max_response_length=8, beta=0.1, chunk_size=3)
    b = jax.tree.map(lambda x: jnp.asarray(x, jnp.int32 if x.dtype.kind == "i" else f32), chunked_batch(22))
    dens = L.loss_denominators(b["mask"], b["distill_mask"], cfg)

    @jax.jit
    def grads(rows):
        part = jax.tree.map(lambda x: x if x.ndim == 2 and x.shape == (D, V) else x[rows], b)
        inputs = L.LossInputs(None, part["mask"], old_logprobs=part["old"], ref_logprobs=part["ref"],
                              advantages=part["adv"], distill_mask=part["distill_mask"])
        f = lambda sh, head: L.chunked_objective(sh, head, part["tg"], inputs, cfg, teacher_hidden=part["th"],
                                                 denominators=dens)[0]
        return jax.value_and_grad(f, argnums=(0, 1))(part["sh"], part["head"])

    (v1, (s1, h1)), (v2, (s2, h2)) = grads(jnp.arange(2)), grads(jnp.arange(2, 4))
    v, (s, h) = grads(jnp.arange(4))
    np.testing.assert_allclose(v1 + v2, v, rtol=1e-6)
    np.testing.assert_allclose(np.concatenate([s1, s2]), s, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(h1 + h2, h, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("layout", ["dv", "vd"])
def test_fused_head_gradient_in_one_product_equals_the_blocked_one(monkeypatch, layout):
    """The fused path adds each chunk's head gradient block by block over the vocabulary on CPU and
    as one product elsewhere (`losses._vocab_blocks`); both give autodiff's gradients."""
    cfg = L.preset("hsd_grpo", max_response_length=8, beta=0.1, chunk_size=3)
    b = jax.tree.map(lambda x: jnp.asarray(x, jnp.int32 if x.dtype.kind == "i" else f32), chunked_batch(23))
    inputs = L.LossInputs(None, b["mask"], old_logprobs=b["old"], ref_logprobs=b["ref"], advantages=b["adv"],
                          distill_mask=b["distill_mask"])
    head = b["head"] if layout == "dv" else b["head"].T

    def grads(fused):
        f = lambda sh, head: L.chunked_objective(sh, head, b["tg"], inputs, dataclasses.replace(cfg, fused_grad=fused),
                                                 teacher_hidden=b["th"], head_layout=layout)[0]
        return jax.jit(jax.grad(f, argnums=(0, 1)))(b["sh"], head)  # a new function: traced afresh

    assert L._vocab_blocks(3, D, V) > 1  # the tests run on CPU
    autodiff, blocked = grads(False), grads(True)
    monkeypatch.setattr(L, "_vocab_blocks", lambda c, d, v: 1)
    whole = grads(True)
    for got in (blocked, whole):
        for g, want in zip(got, autodiff):
            np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7)
