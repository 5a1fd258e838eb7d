"""The stages and their models: encoders, extraction, fusers, heads, fitting, ablations."""
