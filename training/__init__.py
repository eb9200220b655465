"""torch: backbones, the dual-head model with its frozen simplex-ETF projector, losses and the trainer."""
