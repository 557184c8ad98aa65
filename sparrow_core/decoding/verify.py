"""Verification of a draft tree against the target's logits after each node.

`logits[i]` [V] is the target's next-token distribution after the path root..i (one tree forward).
The root is already verified (it was sampled from the target), so verification walks down from it.

Greedy (temperature 0): at node i the target's token is argmax logits[i]; descend into the child that
carries it, if any; the first time none does, that argmax is the bonus token. Siblings carry distinct
tokens (top-k), so at most one child matches and the walk equals a longest-prefix match over the
retrieve paths, which is how it is computed (vectorised, as in EAGLE/Medusa).

Sampling: multi-candidate rejection sampling (SpecInfer's multi-step speculative sampling with the
tree's deterministic candidates as point-mass proposals q = onehot(x)). At node i, with target
distribution p = probabilities(logits[i]) (temperature and top-p, exactly what AR samples from), and
children x_1..x_k in draft-score order:

    r <- p                                           (residual, unnormalised)
    for x in x_1..x_k:
        accept x with probability r(x) / sum(r)       (= min(1, r_n(x) / q(x)) with q(x) = 1)
        if accepted: descend into x and repeat there with a fresh r
        else: r(x) <- 0                               (= max(r_n - q, 0))
    nothing accepted: bonus ~ r / sum(r)

Why this is exact: it is sampling from p by asking in turn "is the draw x_1?" (probability p(x_1)),
"given it is not x_1, is it x_2?" (p(x_2) / (1 - p(x_1))), ..., and finally drawing from p restricted to
the tokens not asked about. Every outcome y has probability p(y), whatever the candidates are, so each
emitted token (drafted or bonus) is distributed exactly as AR's next token given the same prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparrow_core.decoding.draft_tree import DraftTree
from sparrow_core.decoding.sampling import SamplingConfig, probabilities


@dataclass
class VerifyResult:
    accepted: list[int]  # node indices root first (the root always)
    bonus: int  # the next token, sampled from the target after the last accepted node


def verify_greedy(tree: DraftTree, logits: torch.Tensor) -> VerifyResult:
    """Longest retrieve path whose every drafted token equals the target's argmax after its parent."""
    pred = logits.argmax(-1).cpu()  # [Q] the target's token after each node; the tree's metadata is on the CPU
    paths = tree.paths  # [R, D+1]
    child = paths[:, 1:]  # [R, D] node at each depth >= 1 (-1 pad)
    parent = paths[:, :-1]  # [R, D] its parent on the path
    ok = (child >= 0) & (parent >= 0)
    drafted = torch.where(ok, tree.tokens[child.clamp(min=0)], -1)
    wanted = torch.where(ok, pred[parent.clamp(min=0)], -2)
    # accepted length of each path = number of leading matches
    n_acc = (drafted == wanted).long().cumprod(dim=1).sum(dim=1)  # [R]
    best = int(n_acc.argmax())
    accepted = paths[best, : int(n_acc[best]) + 1].tolist()
    return VerifyResult(accepted=accepted, bonus=int(pred[accepted[-1]]))


def rejection_sample(
    p: torch.Tensor, candidates: list[int], generator: torch.Generator | None = None
) -> tuple[int | None, int]:
    """Multi-candidate rejection sampling at one node; see the module docstring.

    p [V]: target distribution. Returns (index into `candidates` of the accepted one or None, token):
    the token is the accepted candidate, or the residual draw when all were rejected.
    """
    r = p.clone()
    for j, x in enumerate(candidates):
        mass = float(r.sum())
        if mass <= 0.0:
            break
        u = float(torch.rand((), generator=generator, device=p.device))
        if u * mass < float(r[x]):  # u < r(x) / sum(r)
            return j, x
        r[x] = 0.0
    if float(r.sum()) <= 0.0:  # candidates covered all of p's mass in floating point: fall back to p
        r = p
    return None, int(torch.multinomial(r / r.sum(), 1, generator=generator))


def verify_sampling(
    tree: DraftTree, logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None
) -> VerifyResult:
    node, accepted = 0, [0]
    while True:
        p = probabilities(logits[node], cfg)  # [V]
        kids = tree.children(node)
        j, tok = rejection_sample(p, [int(tree.tokens[c]) for c in kids], generator)
        if j is None:
            return VerifyResult(accepted=accepted, bonus=tok)
        node = kids[j]
        accepted.append(node)


def verify_tree(
    tree: DraftTree, logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None
) -> VerifyResult:
    """logits [Q, V] after each node -> accepted path (root first) and the next bonus token."""
    if cfg.greedy:
        return verify_greedy(tree, logits)
    return verify_sampling(tree, logits, cfg, generator)
