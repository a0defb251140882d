"""LoRA fine-tuning of a small transformer on a synthetic text task: ``jobs/text_lora.yaml``.

The transformer is a BERT built from a ``transformers`` config object (random init; nothing
is downloaded: ``HF_HUB_OFFLINE=1``), wrapped by ``peft`` with LoRA adapters (Hu et al. 2021,
"LoRA: Low-Rank Adaptation of Large Language Models") on the attention query and value
projections plus the classifier head; every other weight is frozen. Only trainable
parameters travel in the flat vector, so only the adapters are trained, clipped, quantised
and securely aggregated. The frozen base is the same on every node because custom factories
are built with a fixed torch seed.

Features are token ids carried as float32 (exact below 2^24) with ``data.standardize: false``;
the wrapper casts them back to integers.
"""

from __future__ import annotations

import os

import numpy as np
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class LoraClassifier(nn.Module):
    """``forward(token_ids) -> logits`` around a peft-wrapped sequence classifier."""

    def __init__(self, peft_model: nn.Module):
        super().__init__()
        self.m = peft_model

    def forward(self, x):
        return self.m(input_ids=x.long()).logits


def lora_bert(vocab: int = 64, hidden: int = 64, layers: int = 2, heads: int = 4, seq_len: int = 16,
              n_classes: int = 2, r: int = 4, alpha: int = 8) -> nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=2 * hidden,
                        max_position_embeddings=seq_len, num_labels=n_classes,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    base = BertForSequenceClassification(config)
    lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=["query", "value"],
                      modules_to_save=["classifier"])
    return LoraClassifier(get_peft_model(base, lora))


def full_parameters(**kwargs) -> int:
    """d_full: parameters of the whole transformer (for the README's comparison)."""
    m = lora_bert(**kwargs)
    return sum(p.numel() for n, p in m.named_parameters() if "lora_" not in n and "modules_to_save" not in n)


def synthetic_text(n: int = 2000, vocab: int = 64, seq_len: int = 16, seed: int = 0):
    """Sentences of random filler tokens; class 1 when a "positive" keyword (ids 4..7)
    appears more often than a "negative" one (ids 8..11). Token 0 is padding at the end."""
    rng = np.random.default_rng(seed)
    X = rng.integers(12, vocab, size=(n, seq_len))
    y = rng.integers(0, 2, size=n)
    for i in range(n):
        k_major, k_minor = rng.integers(2, 4), rng.integers(0, 2)
        pos, neg = (k_major, k_minor) if y[i] == 1 else (k_minor, k_major)
        slots = rng.choice(seq_len - 2, size=pos + neg, replace=False)
        X[i, slots[:pos]] = rng.integers(4, 8, size=pos)
        X[i, slots[pos:]] = rng.integers(8, 12, size=neg)
        X[i, seq_len - rng.integers(1, 3):] = 0
    return X.astype(np.float32), y.astype(np.int64)
