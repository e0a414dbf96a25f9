"""Generation on a trained model: the terminal chat loop (and, later, the batched engine and the server)."""
