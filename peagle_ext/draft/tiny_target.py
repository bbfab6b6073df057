"""A tiny random target model and the acceptance check of ``python -m peagle_ext train-demo``: a
target whose next token depends on the current token only, so that a small draft learns it in
seconds on a CPU (the demo, ``eval --target demo`` and the tests use it)."""

from __future__ import annotations

import torch
from torch import nn

# The demo target's hidden size (the draft reads three of its states).
TARGET_HIDDEN = 32
# The acceptance check after training: prompts drawn from the target, their length, new tokens each.
EVAL_PROMPTS, EVAL_PROMPT_LEN, EVAL_NEW_TOKENS = 8, 8, 32


class TinyTarget(nn.Module):
    """A tiny random target model for the demo: the next-token distribution depends on the
    current token only (a random Markov chain computed by residual MLP layers).

    ``forward(tokens [S])`` returns (aux_hidden_states [S, num_aux * hidden]: the outputs of its
    ``num_aux`` layers, logits [S, vocab]).
    """

    def __init__(self, vocab_size: int, hidden_size: int, num_aux: int = 3, sharpness: float = 8.0):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden_size)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.RMSNorm(hidden_size), nn.Linear(hidden_size, 2 * hidden_size), nn.GELU(),
                          nn.Linear(2 * hidden_size, hidden_size))
            for _ in range(num_aux)
        )
        self.norm = nn.RMSNorm(hidden_size)
        self.lm_head = nn.Linear(hidden_size, vocab_size, bias=False)
        self.sharpness = sharpness

    def forward(self, tokens: torch.Tensor):
        hidden = self.embed(tokens)
        aux = []
        for layer in self.layers:
            hidden = hidden + layer(hidden)
            aux.append(hidden)
        logits = self.sharpness * self.lm_head(self.norm(hidden)) / self.lm_head.weight.norm(dim=-1)
        return torch.cat(aux, dim=-1), logits

    @torch.no_grad()
    def sample(self, length: int, generator: torch.Generator) -> torch.Tensor:
        """A token sequence [length] drawn from the model's own next-token distribution (on CPU)."""
        table = self(torch.arange(self.embed.num_embeddings, device=self.embed.weight.device))[1].softmax(-1).cpu()
        tokens = [int(torch.randint(table.size(0), (1,), generator=generator))]
        for _ in range(length - 1):
            tokens.append(int(torch.multinomial(table[tokens[-1]], 1, generator=generator)))
        return torch.tensor(tokens, device=self.embed.weight.device)


def demo_target(vocab_size: int, seed: int = 0, device="cpu") -> TinyTarget:
    """The demo's target for a vocabulary size and seed (what ``train-demo --vocab --seed`` trains
    against): ``TinyTarget(vocab_size, 32)`` built right after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return TinyTarget(vocab_size, TARGET_HIDDEN).to(device).eval()


def demo_acceptance(draft, target: TinyTarget, num_speculative_tokens: int, seed: int = 0) -> float:
    """Mean acceptance length (tokens per target forward) of ``draft`` speculating for ``target`` on
    prompts drawn from the target (greedy verification), prompts and new tokens cut to fit the
    draft's position limit; NaN when that limit leaves no room for a new token."""
    from .speculative import TokenwiseTarget, speculative_generate

    positions = draft.config.max_position_embeddings
    prompt_len = min(EVAL_PROMPT_LEN, max(1, positions // 2))
    new_tokens = min(EVAL_NEW_TOKENS, positions - prompt_len - num_speculative_tokens)
    if new_tokens < 1:
        return float("nan")
    generator = torch.Generator().manual_seed(seed)
    prompts = [target.sample(prompt_len, generator).tolist() for _ in range(EVAL_PROMPTS)]
    was_training = draft.training
    draft.eval()
    result = speculative_generate(TokenwiseTarget(target), draft, prompts, num_speculative_tokens, new_tokens)
    draft.train(was_training)
    return result.acceptance_length


