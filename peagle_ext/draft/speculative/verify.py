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


def take_alternative(alternatives, logits, accepted, bonus):
    """Greedy verification of alternative first tokens read beside the chain (alternatives [B, N],
    the target's logits at them the last N of ``logits``): where a row accepted no proposal and an
    alternative equals the target's token there (its ``bonus``), that alternative is accepted and
    the target's argmax after it is the new bonus. Returns (accepted [B], bonus [B], taken [B]: the
    index of the alternative taken, -1 where none)."""
    count = alternatives.shape[1]
    hit = (alternatives == bonus.view(-1, 1)) & (accepted == 0).view(-1, 1)
    taken = torch.where(hit.any(1), hit.long().argmax(1), -1)
    after = logits[:, -count:].argmax(-1).gather(1, taken.clamp(min=0).view(-1, 1)).view(-1)
    return accepted + (taken >= 0).long(), torch.where(taken >= 0, after, bonus), taken


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
