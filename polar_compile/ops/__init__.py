"""The ``polar::`` custom ops. ``import polar_compile.ops`` registers every one of them under ``torch.ops.polar``:

    selective_attention                                  -- ops/selective_attention.py
    selective_up, selective_gated_up, selective_down,
    batch_union_topk                                     -- ops/selective_gemm.py
    route_groups                                         -- ops/route_groups.py
    skinny_linear, skinny_gated_linear                   -- ops/skinny_linear.py
    router_anchor, mlp_anchor                            -- ops/router_anchor.py (graph markers for the passes)

(``import polar_compile`` alone registers none: it stays light and imports no triton.)
"""

from polar_compile.ops import (  # noqa: F401  (imported to register their ops)
    route_groups,
    router_anchor,
    selective_attention,
    selective_gemm,
    skinny_linear,
)
