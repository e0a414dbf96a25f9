"""Planning a training run: scaling laws, memory and cost."""
