"""The model: tokens and masks (:mod:`.tokens`), the transformer (:mod:`.transformer`), activation
names and interventions (:mod:`.hooks`), and the stacked forward used to train many models as one
(:mod:`.stacked`). ``from icl_heads.model import Transformer, act_name, ...`` is the public path."""

from .hooks import PATTERNS_KEY, act_name, explicit_softmax_pattern
from .tokens import CONTEXT, QUERY, TokenLayout, attention_mask, token_layout, tokens
from .transformer import MLP, Attention, Block, Transformer, attend, gate_heads

__all__ = ["CONTEXT", "QUERY", "PATTERNS_KEY", "MLP", "Attention", "Block", "TokenLayout", "Transformer", "act_name",
           "attend", "attention_mask", "explicit_softmax_pattern", "gate_heads", "token_layout", "tokens"]
