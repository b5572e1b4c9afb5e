"""Method references: dynamic routing (forward and gradient), MIND's and ComiRec-DR's routing of
their bilinear predictions, and ESIM's semantic labels, each against a slow loop transcription
of the formula."""
import numpy as np
import pytest
import torch

import bimi


def loop_squash(z):
    """|z|^2 / (1 + |z|^2) * z / |z|, |z| as sqrt(|z|^2 + 1e-9); z a list of scalars."""
    n2 = sum(x * x for x in z)
    return [n2 / (1 + n2) * x / torch.sqrt(n2 + 1e-9) for x in z]


def loop_routing(u_hat, logits, mask, iters):
    """Loops over (b, k, l) with torch scalars; u_hat is detached but in the last iteration."""
    B, K, L, d = u_hat.shape
    a = [[[logits[b, k, l] for l in range(L)] for k in range(K)] for b in range(B)]
    for it in range(iters):
        last = it == iters - 1
        u = u_hat if last else u_hat.detach()
        w = [[[None] * L for _ in range(K)] for _ in range(B)]
        for b in range(B):
            for l in range(L):
                exps = [torch.exp(a[b][k][l]) for k in range(K)]  # softmax over the interests
                for k in range(K):
                    w[b][k][l] = exps[k] / sum(exps) * mask[b, l]
        v = [[loop_squash([sum(w[b][k][l] * u[b, k, l, i] for l in range(L)) for i in range(d)])
              for k in range(K)] for b in range(B)]
        if not last:
            for b in range(B):
                for k in range(K):
                    for l in range(L):
                        a[b][k][l] = a[b][k][l] + sum(u[b, k, l, i] * v[b][k][i] for i in range(d))
    interests = torch.stack([torch.stack([torch.stack(vk) for vk in vb]) for vb in v])
    weights = torch.stack([torch.stack([torch.stack(wk) for wk in wb]) for wb in w])
    return interests, weights


@pytest.mark.parametrize("B,K,L,d,iters", [(2, 3, 5, 4, 1), (3, 4, 6, 5, 3), (1, 2, 7, 3, 4),
                                           (2, 1, 4, 3, 2)])
def test_dynamic_routing_matches_loop_forward_and_gradient(B, K, L, d, iters):
    """Reference: loop_routing, in float64; the gradient of a random linear function of both
    outputs w.r.t. u_hat, which only the last iteration may carry."""
    g = torch.Generator().manual_seed(B * 1000 + K * 100 + L * 10 + iters)
    u_hat = torch.randn(B, K, L, d, generator=g, dtype=torch.float64)
    logits = torch.randn(B, K, L, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, L, generator=g) < 0.6).double()
    mask[:, 0], mask[0, -1] = 1, 0  # every row has a real position; row 0 has padding
    r1 = torch.randn(B, K, d, generator=g, dtype=torch.float64)
    r2 = torch.randn(B, K, L, generator=g, dtype=torch.float64)
    outs, grads = [], []
    for fn in (bimi.dynamic_routing, loop_routing):
        u = u_hat.clone().requires_grad_()
        interests, weights = fn(u, logits.clone(), mask.clone(), iters)
        outs.append((interests.detach(), weights.detach()))
        grads.append(torch.autograd.grad((interests * r1).sum() + (weights * r2).sum(), u)[0])
    (ki, kw), (ri, rw) = outs
    assert ki.shape == (B, K, d) and kw.shape == (B, K, L)
    torch.testing.assert_close(ki, ri, rtol=0, atol=1e-10)
    torch.testing.assert_close(kw, rw, rtol=0, atol=1e-10)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["mind", "comirec-dr"])
def test_mind_and_dr_route_their_bilinear_predictions(name):
    """Reference: u_hat built by loops from the module's parameters (MIND: one shared map W,
    u = W e, logits = routing_init; DR: u[b, k, l] = e[b, l] @ bilinear[l, k], logits 0), then
    loop_routing."""
    torch.manual_seed(0)
    cfg = bimi.Config(model=name, dim=4, interests=3, max_len=6)
    model = bimi.make_model(cfg, 12)
    hist = torch.tensor([[3, 7, 1, 12, 5], [4, 4, 8, 2, 0], [6, 0, 0, 0, 0]])  # right-padded
    # L = 5 < max_len: MIND reads routing_init[:, :L], DR bilinear[:L]
    B, L, K, d = *hist.shape, cfg.interests, cfg.dim
    E = model.items.weight.detach().double()
    W = model.bilinear.weight if name == "mind" else model.bilinear  # Linear: y = W x
    W = W.detach().double()
    u_hat = torch.zeros(B, K, L, d, dtype=torch.float64)
    logits = torch.zeros(B, K, L, dtype=torch.float64)
    for b in range(B):
        for k in range(K):
            for l in range(L):
                e = E[hist[b, l]]
                for j in range(d):
                    if name == "mind":
                        u_hat[b, k, l, j] = sum(W[j, i] * e[i] for i in range(d))
                        logits[b, k, l] = float(model.routing_init[k, l])
                    else:
                        u_hat[b, k, l, j] = sum(e[i] * W[l, k, i, j] for i in range(d))
    mask = (hist > 0).double()
    ri, rw = loop_routing(u_hat, logits, mask, cfg.routing_iters)
    with torch.no_grad():
        ki, kw = model(hist)
    torch.testing.assert_close(ki.double(), ri, rtol=0, atol=1e-5)
    torch.testing.assert_close(kw.double(), rw, rtol=0, atol=1e-5)


@pytest.mark.parametrize("noise,n_prototypes,P", [(0.05, 4, 4), (0.05, 3, 3), (0.0, 6, 4)])
def test_semantic_labels_match_loop(noise, n_prototypes, P):
    """Reference: the kit's prototypes taken as given, each text on its nearest one (a loop over
    squared distances), multi-hots per typical user, cluster means and user inheritance by dicts.
    Clusters 1 and 4 have no typical user; typical user 0 has two texts on one prototype; noise 0
    gives 4 distinct texts for 6 prototypes (P shrinks to 4)."""
    rng = np.random.default_rng(0)
    texts = [(0, 0), (0, 0), (0, 1), (1, 1), (1, 2), (2, 3), (3, 0), (3, 2), (4, 3), (4, 1)]
    # (typical row, direction) of each text
    owner = np.array([row for row, _ in texts])
    vectors = np.eye(6)[[k for _, k in texts]] + noise * rng.normal(size=(len(texts), 6))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    clusters_of_typical = np.array([0, 0, 2, 2, 3])
    assign = np.array([0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 4, 0, 2])
    prototypes, cluster_labels, cluster_labelled = bimi.semantic_labels(
        vectors, owner, clusters_of_typical, 5, n_prototypes, 0, 2)
    labels, labelled = cluster_labels[assign], cluster_labelled[assign]  # as build_esim inherits
    assert prototypes.shape == (P, 6) and labels.shape == (13, P) and labelled.shape == (13,)
    protos = np.asarray(prototypes, dtype=np.float64)
    nearest = []
    for v in vectors.astype(np.float64):
        dists = [sum((v[i] - p[i]) ** 2 for i in range(len(v))) for p in protos]
        nearest.append(min(range(P), key=lambda j: dists[j]))
    assert nearest[0] == nearest[1]  # typical user 0: two texts on one prototype
    hot = {}
    for t, row in enumerate(owner):
        hot.setdefault(int(row), set()).add(nearest[t])
    members = {}
    for row, c in enumerate(clusters_of_typical):
        members.setdefault(int(c), []).append(row)
    for u, c in enumerate(assign):
        rows = members.get(int(c), [])
        expect = [sum(p in hot[r] for r in rows) / len(rows) if rows else 0.0
                  for p in range(P)]
        np.testing.assert_allclose(labels[u], expect, rtol=0, atol=1e-6, err_msg=f"user {u}")
        assert bool(labelled[u]) == bool(rows), f"user {u}"
    assert not labelled[assign == 1].any() and not labelled[assign == 4].any()
