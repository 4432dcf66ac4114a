"""Model-level helpers: loading and saving, the Llama layout, activation capture, LM metrics."""
