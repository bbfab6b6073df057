"""Verification of the draft's proposals against the target's logits: greedy (the output is the
target's own greedy decode) or the standard rejection rule (the output keeps the target's
distribution)."""

from __future__ import annotations

import torch


def draw(probs: torch.Tensor, generator) -> torch.Tensor:
    """One draw per row of probs [..., V]."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def next_tokens(logits, temperature, generator):
    """The target's token from logits [..., V]: argmax at temperature 0, else a draw at ``temperature``."""
    if temperature == 0:
        return logits.argmax(-1)
    return draw(torch.softmax(logits / temperature, -1), generator)


def greedy_verify(proposals, logits):
    """(accepted [B]: leading proposals equal to the target's argmax, bonus [B]: the target's
    argmax after them)."""
    choice = logits.argmax(-1)  # [B, K + 1]
    matches = (proposals == choice[:, :-1]).long()
    accepted = matches.cumprod(1).sum(1)
    return accepted, choice.gather(1, accepted.view(-1, 1)).view(-1)


def tree_paths(parents: list[int]) -> list[list[int]]:
    """Each node's path from the root, [0, ..., node], for a tree given by ``parents`` (node 0 the
    root, -1; every other node's parent an earlier node)."""
    paths: list[list[int]] = []
    for node, parent in enumerate(parents):
        if (node == 0) != (parent < 0) or parent >= node:
            raise ValueError(f"parents: node {node} has parent {parent}; node 0 is the root (-1) and every other "
                             "node's parent is an earlier node")
        paths.append([node] if node == 0 else paths[parent] + [node])
    return paths


def tree_visibility(parents: list[int], device=None) -> torch.Tensor:
    """[Q, Q] bool: node i reads node j where j is on i's path (its ancestors and itself)."""
    visible = torch.zeros(len(parents), len(parents), dtype=torch.bool)
    for node, path in enumerate(tree_paths(parents)):
        visible[node, path] = True
    return visible.to(device)


def tree_verify(tokens, parents: list[int], real, logits):
    """Greedy verification of a tree of tokens [B, Q] (node 0 the step's first token, already
    kept; node i follows its ``parents[i]``; ``real`` [B, Q] False where a row leaves a node empty)
    against the target's logits [B, Q, V] at them: a node is accepted where its parent is and its
    token is the target's argmax at its parent. Each row keeps the path to its deepest accepted
    node (the earliest such slot, so the chain wins a tie), and the target's argmax there is the
    next token. Returns (accepted [B]: that node's depth, bonus [B], node [B], order [B, Q]: the
    path's slots first, then the others in slot order)."""
    batch, width = tokens.shape
    paths = tree_paths(parents)
    device = tokens.device
    depth = torch.tensor([len(path) - 1 for path in paths], device=device)
    parent = torch.tensor([max(p, 0) for p in parents], device=device)
    choice = logits.argmax(-1)  # [B, Q]
    match = real & (tokens == choice[:, parent])
    match[:, 0] = True
    accepted_node = match
    for _ in range(int(depth.max())):  # after d rounds, nodes up to depth d are right
        accepted_node = match & accepted_node[:, parent]
    slot = torch.arange(width, device=device)
    score = torch.where(accepted_node, depth * width + (width - 1 - slot), -1)
    node = score.argmax(1)
    orders = torch.tensor([path + [s for s in range(width) if s not in path] for path in paths], device=device)
    return depth[node], choice.gather(1, node.view(-1, 1)).view(-1), node, orders[node]


def rejection_verify(proposals, draft_probs, draft_vocab, logits, temperature, generator):
    """Standard speculative sampling: proposal i (drawn from q_i) is accepted with probability
    min(1, p_i(x) / q_i(x)); at the first rejection the token is drawn from normalized
    max(p_i - q_i, 0), after K acceptances from p_{K+1}. Returns (accepted [B], token [B])."""
    batch, K = proposals.shape
    p = torch.softmax(logits / temperature, -1)  # [B, K + 1, V]
    q = torch.zeros_like(p[:, :K]).index_copy_(-1, draft_vocab, draft_probs)  # q over the target vocabulary
    p_x = p[:, :K].gather(-1, proposals.unsqueeze(-1)).squeeze(-1)
    q_x = q.gather(-1, proposals.unsqueeze(-1)).squeeze(-1)
    u = torch.rand(batch, K, generator=generator, device=p.device)
    ok = (u * q_x <= p_x).long()  # u < p/q, without dividing by a zero q
    accepted = ok.cumprod(1).sum(1)
    residual = torch.cat([(p[:, :K] - q).clamp(min=0), p[:, K:]], dim=1)
    at = residual[torch.arange(batch), accepted]
    at = torch.where(at.sum(-1, keepdim=True) > 0, at, p[torch.arange(batch), accepted])
    return accepted, draw(at / at.sum(-1, keepdim=True), generator)
