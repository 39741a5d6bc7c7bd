"""Stage 2: a class-conditional autoregressive transformer over stage-1 token grids."""
