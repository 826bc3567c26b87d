"""The model: tokens and masks (:mod:`.tokens`), the transformer (:mod:`.transformer`), hook points,
activation names and the head intervention (:mod:`.hooks`), and the stacked forward used to train many
models as one (:mod:`.stacked`). ``from icl_heads.model import Transformer, act_name, ...`` is the public path."""

from .hooks import (HookedRootModule, HookPoint, act_name, explicit_softmax_pattern, gate_heads, head_hooks,
                    scaled_scores)
from .tokens import CONTEXT, QUERY, TokenLayout, attention_mask, token_layout, tokens
from .transformer import MLP, Attention, Block, LayerNorm, Transformer, attend

__all__ = ["CONTEXT", "QUERY", "MLP", "Attention", "Block", "HookPoint", "HookedRootModule", "LayerNorm", "TokenLayout",
           "Transformer", "act_name", "attend", "attention_mask", "explicit_softmax_pattern", "gate_heads",
           "head_hooks", "token_layout", "scaled_scores", "tokens"]
