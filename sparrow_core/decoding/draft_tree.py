"""EAGLE-2 dynamic draft trees: growth by cumulative log-probability, then the verification metadata.

A tree hangs below the stream's last token. Node 0, the root, is the bonus token already sampled from
the target's previous logits (verified), so every verify forward yields >= 1 token. Growth (EAGLE-2):

    frontier = [root]
    for level in 0 .. depth-1:
        log q(. | path to f) for every frontier node f              (one drafter forward per level)
        each f gets its top_k tokens as children, score(child) = score(f) + log q(child | f)
        the top_k new children by score become the next frontier   (only they are expanded)
    keep the `total_tokens` best non-root nodes by score, plus the root

score is the drafter's log-probability of the whole path, so it never increases along a path: a
child's score <= its parent's. Ranking by (score desc, depth asc) therefore ranks every parent ahead
of its children and the kept set is closed under ancestors (a tree). Chain drafting is top_k = 1.

Metadata for the target's tree forward and for verification, nodes ordered by depth (parents first):
    tokens  [Q]     token of each node
    parents [Q]     parent node index, -1 for the root
    depths  [Q]     0 for the root; the stream puts node i at position next_position + depths[i]
    mask    [Q, Q]  mask[i, j] = node j is node i or one of its ancestors
    paths   [R, D+1] retrieve paths: for each leaf, node indices root..leaf, padded with -1
All of it lives on the CPU (tens of numbers; the drafter's top-k per level is brought over); the stream
moves the mask to the model's device for the tree forward.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass

import numpy as np
import torch

# expand(node_ids [m], tokens [m], parents [m], depth) -> drafter log-probs [m, V] after each node.
# node ids are creation order (root = 0); parents are node ids (-1 for the root); all m share `depth`.
ExpandFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class TreeConfig:
    total_tokens: int = 30  # drafted nodes kept (root excluded)
    depth: int = 4  # drafter forwards per step = max depth of a drafted node
    top_k: int = 8  # children per expanded node, and frontier width

    def __post_init__(self) -> None:
        if self.total_tokens < 0 or self.depth < 0 or self.top_k < 1:
            raise ValueError(f"bad tree config {self}")

    @classmethod
    def parse(cls, text: str) -> TreeConfig:
        """"total,depth,top_k", as the --tree flags take it."""
        parts = text.split(",")
        if len(parts) != 3 or not all(x.strip().isdigit() for x in parts):
            raise ValueError(f"a draft tree is total,depth,top_k (three integers), got {text!r}")
        return cls(*(int(x) for x in parts))

    @classmethod
    def chain(cls, length: int) -> TreeConfig:
        return cls(total_tokens=length, depth=length, top_k=1)


@dataclass
class DraftTree:
    tokens: torch.Tensor  # [Q] int64
    parents: torch.Tensor  # [Q] int64, -1 for the root
    depths: torch.Tensor  # [Q] int64
    scores: torch.Tensor  # [Q] fp32 cumulative draft log-prob (root 0)
    mask: torch.Tensor  # [Q, Q] bool, ancestors and self
    paths: torch.Tensor  # [R, D+1] int64 root-to-leaf node indices, -1 padded

    @property
    def size(self) -> int:
        return int(self.tokens.numel())

    def children(self, node: int) -> list[int]:
        """Child node indices of `node`, best draft score first."""
        kids = (self.parents == node).nonzero().squeeze(1)
        order = self.scores[kids].argsort(descending=True, stable=True)
        return kids[order].tolist()

    def best_path(self, node: int = 0) -> list[int]:
        """From `node`, repeatedly the best-scored child (the first on ties, as `children` orders them): the
        drafter's own continuation. One pass over the nodes as plain lists (every decoding step asks)."""
        parents, scores = self.parents.tolist(), self.scores.tolist()
        best: dict[int, int] = {}  # node -> its best child
        for i in range(1, len(parents)):
            p = parents[i]
            if p not in best or scores[i] > scores[best[p]]:
                best[p] = i
        path = [node]
        while path[-1] in best:
            path.append(best[path[-1]])
        return path


def build_tree(tokens: torch.Tensor, parents: torch.Tensor, scores: torch.Tensor | None = None) -> DraftTree:
    """Metadata of a tree given in parents-first order (parents[i] < i, parents[0] = -1)."""
    q = int(tokens.numel())
    par = parents.tolist()
    if q == 0 or par[0] != -1 or any(p >= i for i, p in enumerate(par) if i):
        raise ValueError("nodes must be in parents-first order with the root first")
    return tree_from_lists(tokens.tolist(), par, None if scores is None else scores.tolist())


def tree_from_lists(tokens: list[int], parents: list[int], scores: list[float] | None = None) -> DraftTree:
    """`build_tree` of plain lists already known to be parents-first (the drafter's growth makes them so):
    Q is tens of nodes, so the paths are worked out in Python and each tensor is made once."""
    q = len(tokens)
    # parents come first, so path(i) = path(parent(i)) + [i]
    path: list[list[int]] = [[0]]
    for i in range(1, q):
        path.append(path[parents[i]] + [i])
    depth = [len(p) - 1 for p in path]
    mask = torch.zeros((q, q), dtype=torch.bool, device="cpu")
    rows = torch.tensor([i for i, p in enumerate(path) for _ in p], device="cpu")
    cols = torch.tensor([j for p in path for j in p], device="cpu")
    mask[rows, cols] = True  # node i sees exactly the nodes on its root-to-i path
    is_parent = set(parents[1:])
    leaves = [i for i in range(q) if i not in is_parent]
    width = max(depth) + 1
    paths = torch.tensor([path[leaf] + [-1] * (width - len(path[leaf])) for leaf in leaves], dtype=torch.long, device="cpu")
    score = torch.tensor([-float(d) for d in depth] if scores is None else scores, dtype=torch.float32, device="cpu")
    return DraftTree(torch.tensor(tokens, dtype=torch.long, device="cpu"), torch.tensor(parents, dtype=torch.long, device="cpu"),
                     torch.tensor(depth, dtype=torch.long, device="cpu"), score, mask, paths)


def root_only(root_token: int) -> DraftTree:
    return tree_from_lists([root_token], [-1])


# One level's request of a growing tree: (node_ids [m], tokens [m], parents [m], depth), what `ExpandFn` takes.
LevelRequest = tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]


def propose_tree(root_token: int, expand: ExpandFn, cfg: TreeConfig, max_depth: int | None = None) -> DraftTree:
    """Grow an EAGLE-2 tree below `root_token` with `expand` (the drafter), see the module docstring.

    `max_depth` caps the depth (e.g. tokens left before max_new_tokens, minus the root).
    """
    growth = grow_tree(root_token, cfg, max_depth)
    try:
        request = next(growth)
        while True:
            request = growth.send(top_children(expand(*request), cfg.top_k))
    except StopIteration as grown:
        return grown.value


def top_children(logp: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The drafter's log-probs [m, V] after m nodes -> each node's best min(top_k, V) children, (log-probs,
    tokens) [m, k] each, on the CPU where the tree is grown (a few dozen numbers per level)."""
    top_lp, top_tok = logp.float().topk(min(top_k, logp.shape[-1]), dim=-1)
    return top_lp.cpu(), top_tok.cpu()


def grow_tree(root_token: int, cfg: TreeConfig, max_depth: int | None = None,
              ) -> Generator[LevelRequest, tuple[torch.Tensor, torch.Tensor], DraftTree]:
    """`propose_tree` as a generator, so that many trees can grow in step (one drafter forward per depth for
    all of them, `proposers.drafter.grow_trees`): it yields each level's request and takes the `top_children`
    of the drafter's log-probs after those nodes; the tree is its return value (StopIteration.value).

    The bookkeeping is plain lists (a level adds m * k <= top_k^2 candidates): a tensor op per number costs
    more than the drafter's arithmetic. Path scores are added in fp32, as the tree stores them."""
    depth = cfg.depth if max_depth is None else max(0, min(cfg.depth, max_depth))
    if depth == 0 or cfg.total_tokens == 0:
        return root_only(root_token)
    # every node ever created, in creation order (root = 0)
    tok, par, dep, sc = [root_token], [-1], [0], [0.0]
    frontier = [0]
    for level in range(depth):
        ids = torch.tensor([frontier, [tok[f] for f in frontier], [par[f] for f in frontier]], device="cpu")  # [3, m]: one tensor
        top_lp, top_tok = yield ids[0], ids[1], ids[2], level  # [m, k] each
        m, k = top_lp.shape
        # path log-probs of candidate c = (frontier c // k, rank c % k), added in fp32 (numpy: no tensor to make)
        cand = (top_lp.numpy() + np.asarray([sc[f] for f in frontier], dtype=np.float32)[:, None]).reshape(-1).tolist()
        first = len(tok)
        tok.extend(top_tok.reshape(-1).tolist())
        par.extend(f for f in frontier for _ in range(k))
        dep.extend([level + 1] * (m * k))
        sc.extend(cand)
        if level + 1 < depth:  # the next frontier: the best top_k of the new level (the last is never expanded)
            best = range(m * k) if m * k <= cfg.top_k else sorted(sorted(range(m * k), key=cand.__getitem__, reverse=True)[: cfg.top_k])
            frontier = [first + c for c in best]
    # keep the best `total_tokens` non-root nodes; rank by (score desc, depth asc) => ancestor-closed.
    # Python's sort is stable: ties keep creation order.
    kept = [0] + sorted(range(1, len(tok)), key=lambda i: (-sc[i], dep[i]))[: cfg.total_tokens]
    kept.sort(key=dep.__getitem__)  # parents-first order: by depth, then by score (stable)
    new_index = {node: i for i, node in enumerate(kept)}
    if any(par[node] not in new_index for node in kept[1:]):
        raise AssertionError("kept draft nodes are not closed under ancestors")
    return tree_from_lists([tok[node] for node in kept], [-1] + [new_index[par[node]] for node in kept[1:]], [sc[node] for node in kept])
